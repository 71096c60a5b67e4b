"""Grounding text: boxes and quads in a model's coordinates, parsed, formatted and mapped.

Qwen2-VL writes a referred object as
`<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, with
coordinates normalised to 0..999 of the image (the `RELATIVE` frame), so a pixel position is
x / 1000 * width. Several boxes may follow one reference, boxes may come without a reference,
and text regions use `<|quad_start|>(x1,y1),...,(x4,y4)<|quad_end|>`. Decode with
`skip_special_tokens=False` to keep these markers.

Qwen2.5-VL writes boxes in pixels of the RESIZED input the model saw (after smart_resize), most
often as JSON: `[{"bbox_2d": [x1, y1, x2, y2], "label": "the dog"}]`. `parse_grounding` reads
both forms; `frame_for(model_type, resized_size)` says which frame a model's numbers are in, and
`Box.to_pixels(width, height, frame)` maps them onto the original image. Mapping a Qwen2.5-VL box
as if it were relative (or the other way round) puts it in the wrong place: keep the frame with
the numbers.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from qwen2vl.tokenizer import (
    BOX_END,
    BOX_START,
    OBJECT_REF_END,
    OBJECT_REF_START,
    QUAD_END,
    QUAD_START,
)

SCALE = 1000  # Qwen2-VL's coordinates are integers in [0, SCALE)

Point = tuple[int, int]


@dataclass(frozen=True)
class Frame:
    """What a model's box numbers measure: `width` units span the image's width, `height` its
    height."""

    width: float
    height: float

    def to_pixels(self, x: float, y: float, width: int, height: int) -> tuple[float, float]:
        return x / self.width * width, y / self.height * height

    def from_pixels(self, x: float, y: float, width: int, height: int) -> Point:
        """Rounded and clamped to [0, units - 1] (for training targets)."""
        return _clamp(x / width * self.width, self.width), _clamp(
            y / height * self.height, self.height
        )


RELATIVE = Frame(SCALE, SCALE)  # Qwen2-VL: 0..999 of the image

# Families whose boxes are pixels of the resized input (the rest write RELATIVE coordinates).
PIXEL_FRAME_MODELS = frozenset({"qwen2_5_vl"})


def frame_for(model_type: str, resized_size: tuple[int, int]) -> Frame:
    """The frame a model family writes its boxes in, for an image resized to (width, height)."""
    if model_type in PIXEL_FRAME_MODELS:
        return Frame(*resized_size)
    return RELATIVE


_POINT = re.compile(r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")
_ITEM = re.compile(
    re.escape(OBJECT_REF_START) + r"(?P<ref>.*?)" + re.escape(OBJECT_REF_END)
    + "|" + re.escape(BOX_START) + r"(?P<box>.*?)" + re.escape(BOX_END)
    + "|" + re.escape(QUAD_START) + r"(?P<quad>.*?)" + re.escape(QUAD_END)
    + "|" + r'(?P<json>\{[^{}]*"bbox_2d"[^{}]*\})',
    re.DOTALL,
)  # fmt: skip


@dataclass(frozen=True)
class Box:
    """Axis-aligned box, corners in a model's frame (`RELATIVE` unless said otherwise)."""

    x1: int
    y1: int
    x2: int
    y2: int

    def to_pixels(
        self, width: int, height: int, frame: Frame = RELATIVE
    ) -> tuple[float, float, float, float]:
        """Corners in pixels of the original image of size (width, height)."""
        return (
            *frame.to_pixels(self.x1, self.y1, width, height),
            *frame.to_pixels(self.x2, self.y2, width, height),
        )

    @classmethod
    def from_pixels(
        cls,
        x1: float,
        y1: float,
        x2: float,
        y2: float,
        width: int,
        height: int,
        frame: Frame = RELATIVE,
    ) -> Box:
        """The inverse of `to_pixels`, rounded and clamped into the frame (training targets)."""
        return cls(
            *frame.from_pixels(x1, y1, width, height), *frame.from_pixels(x2, y2, width, height)
        )


@dataclass(frozen=True)
class Quad:
    """Four corners in a model's frame (rotated text boxes)."""

    points: tuple[Point, Point, Point, Point]

    def to_pixels(
        self, width: int, height: int, frame: Frame = RELATIVE
    ) -> list[tuple[float, float]]:
        return [frame.to_pixels(x, y, width, height) for x, y in self.points]


@dataclass
class GroundedObject:
    """A referred object: its label (None for boxes written without a reference) and shapes."""

    label: str | None
    boxes: list[Box] = field(default_factory=list)
    quads: list[Quad] = field(default_factory=list)


def _clamp(value: float, units: float) -> int:
    return min(round(units) - 1, max(0, round(value)))


def _points(body: str) -> list[Point]:
    return [(round(float(x)), round(float(y))) for x, y in _POINT.findall(body)]


# -- parsing ------------------------------------------------------------------------------------


def parse_grounding(text: str) -> list[GroundedObject]:
    """Objects in generated text, in order of appearance.

    Boxes and quads attach to the reference right before them (only whitespace or commas
    between); others get label None. A box body holding several point pairs gives several
    boxes; malformed bodies (odd point count, no points) are skipped, as the model's text
    around them is still useful. A JSON entry `{"bbox_2d": [x1, y1, x2, y2], "label": ...}`
    (Qwen2.5-VL) is one object on its own.
    """
    objects: list[GroundedObject] = []
    current: GroundedObject | None = None
    pos = 0
    for m in _ITEM.finditer(text):
        adjacent = current is not None and not text[pos : m.start()].strip(" \t\r\n,;")
        pos = m.end()
        if m.group("json") is not None:
            current = None
            objects += _json_object(m.group("json"))
            continue
        if m.group("ref") is not None:
            current = GroundedObject(label=m.group("ref").strip())
            objects.append(current)
            continue
        boxes, quads = _shapes(m.group("box"), m.group("quad"))
        if not (boxes or quads):
            continue
        if not adjacent:
            current = GroundedObject(label=None)
            objects.append(current)
        current.boxes.extend(boxes)
        current.quads.extend(quads)
    return objects


def parse_box_body(body: str) -> list[Box]:
    """The boxes of one ``<|box_start|>...<|box_end|>`` body: ``(x1,y1),(x2,y2)`` pairs (none
    when the point count is odd)."""
    pts = _points(body)
    if len(pts) % 2:
        return []
    return [Box(*a, *b) for a, b in zip(pts[::2], pts[1::2], strict=True)]


def map_points(text: str, change: Callable[[float, float], tuple[float, float]]) -> str:
    """`text` with every box and quad corner (markup or JSON) moved by `change` and rounded;
    the rest of the text, and entries that do not parse, stay as they are."""

    def point(m: re.Match) -> str:
        x, y = change(float(m.group(1)), float(m.group(2)))
        return f"({round(x)},{round(y)})"

    def item(m: re.Match) -> str:
        if m.group("ref") is not None:
            return m.group(0)
        if m.group("json") is not None:
            return _map_json(m.group("json"), change)
        return _POINT.sub(point, m.group(0))

    return _ITEM.sub(item, text)


def _map_json(entry: str, change: Callable[[float, float], tuple[float, float]]) -> str:
    if not _json_object(entry):
        return entry
    d = json.loads(entry)
    x1, y1, x2, y2 = d["bbox_2d"]
    d["bbox_2d"] = [round(v) for v in (*change(x1, y1), *change(x2, y2))]
    return json.dumps(d, ensure_ascii=False)


def _json_object(entry: str) -> list[GroundedObject]:
    """The object of one JSON entry, or none when it is not a well-formed box."""
    try:
        d = json.loads(entry)
    except ValueError:
        return []
    box = d.get("bbox_2d")
    if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
        return []
    label = d.get("label")
    return [GroundedObject(label if isinstance(label, str) else None, [Box(*map(round, box))])]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _shapes(box_body: str | None, quad_body: str | None) -> tuple[list[Box], list[Quad]]:
    if box_body is not None:
        return parse_box_body(box_body), []
    pts = _points(quad_body or "")
    return [], [Quad(tuple(pts))] if len(pts) == 4 else []


# -- formatting ---------------------------------------------------------------------------------


def format_box(box: Box) -> str:
    return f"{BOX_START}({box.x1},{box.y1}),({box.x2},{box.y2}){BOX_END}"


def format_quad(quad: Quad) -> str:
    body = ",".join(f"({x},{y})" for x, y in quad.points)
    return f"{QUAD_START}{body}{QUAD_END}"


def format_object(obj: GroundedObject) -> str:
    """Reference followed by its boxes and quads, as the model writes them."""
    ref = f"{OBJECT_REF_START}{obj.label}{OBJECT_REF_END}" if obj.label is not None else ""
    return ref + "".join(map(format_box, obj.boxes)) + "".join(map(format_quad, obj.quads))


def format_grounding(objects: Iterable[GroundedObject], separator: str = "\n") -> str:
    """An answer text (e.g. a training target) listing the objects."""
    return separator.join(format_object(o) for o in objects)


def format_json(objects: Iterable[GroundedObject]) -> str:
    """The objects' boxes as Qwen2.5-VL writes them: a fenced JSON list, one entry per box."""
    entries = [
        json.dumps({"bbox_2d": [b.x1, b.y1, b.x2, b.y2], "label": o.label}, ensure_ascii=False)
        for o in objects
        for b in o.boxes
    ]
    return "```json\n[\n" + ",\n".join("\t" + e for e in entries) + "\n]\n```"


def objects_in_pixels(
    objects: Iterable[GroundedObject], width: int, height: int, frame: Frame = RELATIVE
) -> list[dict[str, Any]]:
    """The objects as plain data in pixels of the original (width x height) image:
    `{"label", "boxes": [[x1, y1, x2, y2], ...], "quads": [[[x, y] x 4], ...]}`, to 0.1 px."""
    return [
        {
            "label": o.label,
            "boxes": [[round(v, 1) for v in b.to_pixels(width, height, frame)] for b in o.boxes],
            "quads": [
                [[round(x, 1), round(y, 1)] for x, y in q.to_pixels(width, height, frame)]
                for q in o.quads
            ],
        }
        for o in objects
    ]


def grounding_prompt(label: str) -> str:
    """A user request for the box of `label` (plain text: user text never holds the markers)."""
    return f"Find the {label} in the image and output its bounding box."


# -- drawing ------------------------------------------------------------------------------------

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
)  # fmt: skip


def draw_objects(
    image: Image.Image,
    objects: Sequence[GroundedObject],
    *,
    line_width: int = 3,
    frame: Frame = RELATIVE,
) -> Image.Image:
    """A copy of `image` (original size) with each object's shapes, in `frame`, drawn on it.

    Colours follow the order labels first appear, so the same label keeps one colour.
    """
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    colours: dict[str | None, tuple[int, int, int]] = {}
    for obj in objects:
        colour = colours.setdefault(obj.label, PALETTE[len(colours) % len(PALETTE)])
        for box in obj.boxes:
            x1, y1, x2, y2 = box.to_pixels(*canvas.size, frame)
            draw.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)),
                           outline=colour, width=line_width)  # fmt: skip
            _label(draw, font, obj.label, (min(x1, x2), min(y1, y2)), colour)
        for quad in obj.quads:
            corners = quad.to_pixels(*canvas.size, frame)
            draw.polygon(corners, outline=colour, width=line_width)
            _label(draw, font, obj.label, corners[0], colour)
    return canvas


def _label(draw: ImageDraw.ImageDraw, font, text: str | None, at, colour) -> None:
    if not text:
        return
    left, top, right, bottom = draw.textbbox(at, text, font=font)
    y_shift = min(bottom - top + 2, at[1])  # above the box, unless that leaves the image
    box = (left, top - y_shift, right + 4, bottom - y_shift + 2)
    draw.rectangle(box, fill=colour)
    draw.text((at[0] + 2, at[1] - y_shift), text, fill=(255, 255, 255), font=font)


def to_png(image: Image.Image) -> bytes:
    """PNG bytes, for the CLI and the web page."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
