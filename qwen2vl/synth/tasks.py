"""The synthetic tasks: each `make_<task>(rng)` draws one question with its media and answer.

Pure functions of the numpy Generator: the same generator state gives the same sample. A sample
carries what the conversation is built from (question, answer, media) and what eval scores
against (`target`, and `box` for grounding). Answers are short so a tiny model can learn them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product

import numpy as np
from PIL import Image

from qwen2vl.grounding import Box, GroundedObject, format_object, grounding_prompt
from qwen2vl.synth.world import (
    CELL,
    COLOURS,
    GLYPH_BOX,
    MAX_SIDE,
    MIN_SIDE,
    SHAPES,
    Shape,
    canvas,
    glyph_mask,
    place,
    random_grey,
    random_look,
    random_size,
    render,
)

WORDS = ("cat", "dog", "sun", "box", "red", "map", "cup", "hat", "pen", "key", "tree", "fish")
DIRECTIONS = ("left", "right", "up", "down")
MAX_COUNT = 6
MAX_BOUNCES = 3
DIRECTION_FRAMES = 8  # frames are an even count: the vision tower merges frames in pairs
BOUNCE_FRAMES = 16
OCR_SCALE = 3  # glyphs 18 x 27 pixels: one fills most of a 28-pixel token cell
VIDEO_FPS = 2.0  # the rate the frame lists count as sampled at (the part's "sample_fps")


@dataclass
class Sample:
    """One synthetic question. `images` go before the question in the user turn, then `video`
    (its frames) if any; `shapes` are the drawn objects (for a video, the moving object in
    each frame), kept so tests can check answers against the drawing."""

    task: str
    question: str
    answer: str  # the assistant's reply, word for word
    target: str | int  # the value eval compares: "red circle", 3, "left", "yes", ...
    images: list[Image.Image] = field(default_factory=list)
    video: list[Image.Image] | None = None
    box: Box | None = None  # grounding only: the answer's box in [0, 1000) coordinates
    shapes: list[Shape] = field(default_factory=list)
    glyphs: list[tuple[str, tuple[int, int, int, int]]] = field(default_factory=list)  # OCR

    def shapes_of(self, item: int) -> list[Shape]:
        """The objects drawn in image `item` (or video frame `item`)."""
        if self.video is not None or self.task == "compare":
            return [self.shapes[item]]
        return list(self.shapes)


def _single(rng: np.random.Generator, look: tuple[str, str]) -> tuple[Image.Image, Shape]:
    """An image of one object taking 30..80 % of the shorter side."""
    width, height = random_size(rng)
    side = min(width, height)
    (shape,) = place(rng, width, height, [look], min_size=side * 3 // 10, max_size=side * 8 // 10)
    return render(width, height, random_grey(rng), [shape]), shape


def _article(word: str) -> str:
    return "An" if word[0] in "aeiou" else "A"


def make_shape(rng: np.random.Generator) -> Sample:
    kind, colour = random_look(rng)
    image, shape = _single(rng, (kind, colour))
    return Sample(
        "shape",
        "What shape is this?",
        f"{_article(colour)} {colour} {kind}.",
        shape.label,
        [image],
        shapes=[shape],
    )


def make_count(rng: np.random.Generator) -> Sample:
    n = int(rng.integers(1, MAX_COUNT + 1))
    width, height = random_size(rng, lo=84)
    shapes = place(rng, width, height, [random_look(rng) for _ in range(n)], min_size=10)
    image = render(width, height, random_grey(rng), shapes)
    return Sample("count", "How many shapes are there?", str(n), n, [image], shapes=shapes)


def make_ocr(rng: np.random.Generator) -> Sample:
    """A number below 10000 or a word, one character to a token: the image's sides are whole
    28-pixel cells (so the processor keeps its size) and each glyph sits inside its own cell.
    Text drawn across the token grid was read by a linear probe on only 14 % of the tiny
    ViT's character tokens, and OCR stayed near 10 % (measured)."""
    if rng.random() < 0.5:
        text = str(int(rng.integers(0, 10000)))
    else:
        text = str(rng.choice(WORDS))
    grey = random_grey(rng)
    colour = COLOURS[str(rng.choice(list(COLOURS)))]
    cols = int(rng.integers(max(MIN_SIDE // CELL, len(text)), MAX_SIDE // CELL + 1))
    rows = int(rng.integers(MIN_SIDE // CELL, MAX_SIDE // CELL + 1))
    image = canvas(cols * CELL, rows * CELL, grey)
    first, row = int(rng.integers(0, cols - len(text) + 1)), int(rng.integers(0, rows))
    side_x, side_y = (OCR_SCALE * n for n in GLYPH_BOX)
    # one offset for the whole text (it stays a line), never on a cell's first column: the
    # image's first column is background, as in every still picture
    dx, dy = int(rng.integers(1, CELL - side_x + 1)), int(rng.integers(0, CELL - side_y + 1))
    glyphs = []
    for k, char in enumerate(text):
        x, y = (first + k) * CELL + dx, row * CELL + dy
        box = (x, y, x + side_x, y + side_y)
        image.paste(colour, box, glyph_mask(char, OCR_SCALE))
        glyphs.append((char, box))
    return Sample(
        "ocr", "What is written in the image?", text, text, [image], glyphs=glyphs,
    )  # fmt: skip


def make_grounding(rng: np.random.Generator) -> Sample:
    """One to three objects, all different in colour or kind; the question names one of them."""
    combos = list(product(SHAPES, COLOURS))
    n = int(rng.integers(1, 4))
    looks = [combos[int(i)] for i in rng.choice(len(combos), n, replace=False)]
    width, height = random_size(rng)
    shapes = place(rng, width, height, looks, min_size=12)
    image = render(width, height, random_grey(rng), shapes)
    shape = shapes[int(rng.integers(0, n))]
    box = Box.from_pixels(*shape.corners, width, height)
    answer = format_object(GroundedObject(shape.label, [box]))
    return Sample(
        "grounding", grounding_prompt(shape.label), answer, shape.label, [image], box=box,
        shapes=shapes,
    )  # fmt: skip


def make_compare(rng: np.random.Generator) -> Sample:
    """Two images of one object each; asks whether they share the shape (or the colour)."""
    attribute = "shape" if rng.random() < 0.5 else "colour"
    same = bool(rng.random() < 0.5)
    first = random_look(rng)
    second = random_look(rng)
    pool = SHAPES if attribute == "shape" else tuple(COLOURS)
    k = 0 if attribute == "shape" else 1
    others = [v for v in pool if v != first[k]]
    value = first[k] if same else str(rng.choice(others))
    second = (value, second[1]) if k == 0 else (second[0], value)
    (a, sa), (b, sb) = _single(rng, first), _single(rng, second)
    answer = "yes" if same else "no"
    return Sample(
        "compare", f"Do the two images show the same {attribute}?", answer.capitalize() + ".",
        answer, [a, b], shapes=[sa, sb],
    )  # fmt: skip


def _moving_object(rng: np.random.Generator) -> tuple[int, int, int, Shape]:
    """(width, height, grey, shape at the origin corner) for a video."""
    width, height = random_size(rng, lo=56, hi=112)
    size = int(rng.integers(10, min(width, height) // 4 + 1))
    kind, colour = random_look(rng)
    return width, height, random_grey(rng), Shape(kind, colour, 0, 0, size - 1, size - 1)


def make_video_direction(rng: np.random.Generator) -> Sample:
    """An object crossing most of the frame in a straight line."""
    width, height, grey, shape = _moving_object(rng)
    direction = str(rng.choice(DIRECTIONS))
    size = shape.x1 + 1
    along = width - size if direction in ("left", "right") else height - size
    across = height - size if direction in ("left", "right") else width - size
    start, end = int(rng.integers(0, along // 5 + 1)), along - int(rng.integers(0, along // 5 + 1))
    if direction in ("left", "up"):
        start, end = along - start, along - end
    fixed = int(rng.integers(0, across + 1))
    track = np.linspace(start, end, DIRECTION_FRAMES).round().astype(int)
    moves = [(int(p), fixed) if direction in ("left", "right") else (fixed, int(p)) for p in track]
    frames, shapes = _film(width, height, grey, shape, moves)
    return Sample(
        "video_direction", "Which way does the object move?", f"{direction.capitalize()}.",
        direction, video=frames, shapes=shapes,
    )  # fmt: skip


def bounce_track(start: int, speed: int, room: int, frames: int) -> tuple[list[int], int]:
    """Positions in 0..room of an object moving `speed` px a frame and reflecting off both
    ends, and how many times it reflected. `speed` < `room`, so at most one bounce a frame."""
    track, pos, bounces = [start], start, 0
    for _ in range(frames - 1):
        pos += speed
        if pos > room or pos < 0:
            pos = 2 * room - pos if pos > room else -pos
            speed, bounces = -speed, bounces + 1
        track.append(pos)
    return track, bounces


def turns(track: list[int]) -> int:
    """How often a track visibly reverses (-1 for a step that does not move: never visible)."""
    steps = np.sign(np.diff(track))
    if not steps.all():
        return -1
    return int((steps[1:] != steps[:-1]).sum())


def make_video_bounces(rng: np.random.Generator) -> Sample:
    """An object going back and forth along one axis; the answer is how often it turned."""
    want = int(rng.integers(0, MAX_BOUNCES + 1))
    while True:  # rejection sampling: each try is cheap and every count is reachable
        width, height, grey, shape = _moving_object(rng)
        horizontal = bool(rng.random() < 0.5)
        size = shape.x1 + 1
        room = (width if horizontal else height) - size
        across = (height if horizontal else width) - size
        speed = int(rng.integers(2, max(3, room // 3))) * (1 if rng.random() < 0.5 else -1)
        track, bounces = bounce_track(int(rng.integers(0, room + 1)), speed, room, BOUNCE_FRAMES)
        if bounces == want and turns(track) == bounces:
            break  # else a bounce hides: in the first step, or a step ending where it began
    fixed = int(rng.integers(0, across + 1))
    moves = [(p, fixed) if horizontal else (fixed, p) for p in track]
    frames, shapes = _film(width, height, grey, shape, moves)
    return Sample(
        "video_bounces", "How many times does the object bounce?", str(want), want,
        video=frames, shapes=shapes,
    )  # fmt: skip


def _film(
    width: int, height: int, grey: int, shape: Shape, moves: list[tuple[int, int]]
) -> tuple[list[Image.Image], list[Shape]]:
    shapes = [shape.moved(dx, dy) for dx, dy in moves]
    return [render(width, height, grey, [s]) for s in shapes], shapes


TASKS: dict[str, Callable[[np.random.Generator], Sample]] = {
    "shape": make_shape,
    "count": make_count,
    "ocr": make_ocr,
    "grounding": make_grounding,
    "compare": make_compare,
    "video_direction": make_video_direction,
    "video_bounces": make_video_bounces,
}
ALL_TASKS = tuple(TASKS)
