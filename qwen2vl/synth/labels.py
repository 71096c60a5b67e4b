"""Dense labels of a synthetic scene on the vision tower's token grid, for vision pretraining.

The real Qwen2-VL starts from a pretrained ViT (DFN's CLIP); the default model's ViT is
pretrained on what the synthetic world knows about every pixel it drew. Labels are given per
merged token (the 2x2-patch cell one LLM token stands for), in the merger's output order
(temporal slot, row, column), plus a few per-item values:

    colour, kind      the object covering most of the cell, if at least COVERED of it, and
                      each object's most covered cell however small it is (0 = background)
    box               that object's box, corners / image size, in [0, 1]
    x1_hundreds ...   the hundreds digit of each of that box's corners as a grounding answer
                      writes them (x1, y1, x2, y2 in [0, 1000); -1 off objects): the digit the
                      LLM writes first, readable from one head (the tens digit was not learnt
                      by such a head: its loss stayed at chance, ln 10, measured)
    where             the cell's centre / image size: absolute position, which neither rotary
                      (relative) nor the LLM's M-RoPE (nearly flat for a 64-wide model) gives;
                      the canvas's ramps (`world.canvas`) make it visible
    char_k            the text's k-th character if its centre lies in the cell (0 = none, -1
                      outside OCR pictures): one head per place, so a cell holding two
                      characters labels both and says which comes first
    count             objects in the image; direction, bounces for videos (-1 = no label)
    shape             the kind of the item's only object (-1 unless it shows exactly one)
    text_k            the text's k-th character (0 = the text is shorter)
    colours, kinds    which colours and kinds occur (multi-hot)

A video's temporal slot j (frames 2j, 2j+1) is labelled from frame 2j.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import numpy as np
from PIL import Image

from qwen2vl.grounding import Box
from qwen2vl.synth.tasks import DIRECTIONS, Sample
from qwen2vl.synth.world import COLOURS, SHAPES, Shape, shape_mask

CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
MAX_TEXT = 4  # characters a text may have (WORDS and numbers below 10000)
COVERED = 0.15  # share of a cell an object must cover to label it
BOX_DIGITS = ("x1_hundreds", "y1_hundreds", "x2_hundreds", "y2_hundreds")
HEADS = {  # per-token classification heads: name -> classes (label -1: not labelled)
    "colour": len(COLOURS) + 1,
    "kind": len(SHAPES) + 1,
    **{f"char_{k}": len(CHARS) + 1 for k in range(MAX_TEXT)},
    **dict.fromkeys(BOX_DIGITS, 10),
}
# Per image / video, read from an attention-weighted mean of its tokens (what an LLM head can do).
ITEM_HEADS = {
    "count": 7,
    "shape": len(SHAPES),
    "direction": len(DIRECTIONS),
    "bounces": 4,
    **{f"text_{k}": len(CHARS) + 1 for k in range(MAX_TEXT)},  # k-th character, 0 = none
}
ITEM_SETS = {"colours": len(COLOURS), "kinds": len(SHAPES)}  # which occur: multi-hot


@dataclass
class ItemLabels:
    """Labels of one image or video: per-token arrays of length N (tokens of the item)."""

    tokens: dict[str, np.ndarray]  # HEADS names -> [N] int64
    box: np.ndarray  # [N, 4] float32, valid where colour > 0
    where: np.ndarray  # [N, 2] float32
    item: dict[str, int]  # ITEM_HEADS names -> class, -1 when unlabelled
    sets: dict[str, np.ndarray]  # ITEM_SETS names -> [classes] 0/1 float32 (all 0 for text)


def scene_labels(
    sample: Sample, grids: list[tuple[int, int, int]], merge: int = 2
) -> list[ItemLabels]:
    """Labels of each visual item of `sample` (its images, then its video), given each item's
    (t, h, w) patch grid as the processor made it."""
    out = []
    for i, image in enumerate(sample.images):
        out.append(_item(sample, [image], [sample.shapes_of(i)], grids[i], merge))
    if sample.video is not None:
        frames = sample.video[::2]
        shapes = [sample.shapes_of(k) for k in range(0, len(sample.video), 2)]
        out.append(_item(sample, frames, shapes, grids[len(sample.images)], merge))
    return out


def _item(sample, frames, shapes_per_slot, grid, merge) -> ItemLabels:
    t, h, w = grid
    rows, cols = h // merge, w // merge
    if t != len(frames):
        raise ValueError(f"grid {grid} has {t} temporal slots for {len(frames)} labelled frames")
    slots = [
        _slot(sample, frame, shapes, rows, cols)
        for frame, shapes in zip(frames, shapes_per_slot, strict=True)
    ]
    tokens = {name: np.concatenate([s[0][name] for s in slots]) for name in HEADS}
    box = np.concatenate([s[1] for s in slots])
    where = np.concatenate([s[2] for s in slots])
    sets = {name: np.zeros(n, dtype=np.float32) for name, n in ITEM_SETS.items()}
    for s in shapes_per_slot[0]:
        sets["colours"][list(COLOURS).index(s.colour)] = 1
        sets["kinds"][SHAPES.index(s.kind)] = 1
    return ItemLabels(tokens, box, where, _item_values(sample, shapes_per_slot[0]), sets)


def _item_values(sample: Sample, shapes: list[Shape]) -> dict[str, int]:
    values = dict.fromkeys(ITEM_HEADS, -1)
    if sample.video is None and sample.task != "ocr":
        values["count"] = len(shapes)
    if len(shapes) == 1:
        values["shape"] = SHAPES.index(shapes[0].kind)
    if sample.task == "ocr":
        text = str(sample.target)
        for k in range(MAX_TEXT):
            values[f"text_{k}"] = CHARS.index(text[k]) + 1 if k < len(text) else 0
    if sample.task == "video_direction":
        values["direction"] = DIRECTIONS.index(str(sample.target))
    if sample.task == "video_bounces":
        values["bounces"] = int(sample.target)
    return values


def _slot(sample: Sample, frame: Image.Image, shapes: list[Shape], rows: int, cols: int):
    width, height = frame.size
    n = rows * cols
    tokens = {name: np.full(n, _unset(name, sample), dtype=np.int64) for name in HEADS}
    box = np.zeros((n, 4), dtype=np.float32)
    cover = [_coverage(shape_mask(s, width, height), rows, cols) for s in shapes]
    if cover:
        stack = np.stack(cover)  # [objects, n]
        best, share = stack.argmax(0), stack.max(0)
        for k, s in enumerate(shapes):
            on = (best == k) & (share >= COVERED)
            mine = int(stack[k].argmax())
            if not on.any() and best[mine] == k:
                # an object smaller than a cell (a 12-pixel one straddling four cells covers
                # each by under 15 %) labels the cell it covers most: else it has no labelled
                # cell at all and pretraining teaches its cells as background (measured: such
                # grounding targets, 15 % of the eval's, were found 13 % of the time)
                on[mine] = True
            tokens["colour"][on] = list(COLOURS).index(s.colour) + 1
            tokens["kind"][on] = SHAPES.index(s.kind) + 1
            x0, y0, x1, y1 = s.corners
            box[on] = (x0 / width, y0 / height, x1 / width, y1 / height)
            written = Box.from_pixels(x0, y0, x1, y1, width, height)
            for name, value in zip(BOX_DIGITS, astuple(written), strict=True):
                tokens[name][on] = value // 100
    for index, (char, (x0, y0, x1, y1)) in enumerate(sample.glyphs):
        col = int((x0 + x1) / 2 / width * cols)
        row = int((y0 + y1) / 2 / height * rows)
        tokens[f"char_{index}"][row * cols + col] = CHARS.index(char) + 1
    ys, xs = np.meshgrid(
        (np.arange(rows) + 0.5) / rows, (np.arange(cols) + 0.5) / cols, indexing="ij"
    )
    where = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)
    return tokens, box, where


def _unset(head: str, sample: Sample) -> int:
    """A token's label where nothing sets it: 0 (background, no character), or -1 (not
    labelled) for box digits (they exist on objects only) and for characters outside OCR
    pictures (else the rare character tokens drown among "no text" ones)."""
    if head in BOX_DIGITS or (head.startswith("char_") and sample.task != "ocr"):
        return -1
    return 0


def _coverage(mask: Image.Image, rows: int, cols: int) -> np.ndarray:
    """Share of each cell the mask covers, [rows * cols] (a box filter is an exact cell mean)."""
    small = mask.resize((cols, rows), Image.Resampling.BOX)
    return (np.asarray(small, dtype=np.float32) / 255.0).ravel()
