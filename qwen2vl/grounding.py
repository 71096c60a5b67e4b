"""Grounding text: boxes and quads in the model's [0, 1000) coordinates, parsed and formatted.

Qwen2-VL writes a referred object as
`<|object_ref_start|>the dog<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, with
coordinates normalised to 0..999 of the ORIGINAL image (not the resized one the model saw), so
a pixel position is x / 1000 * width. Several boxes may follow one reference, boxes may come
without a reference, and text regions use `<|quad_start|>(x1,y1),...,(x4,y4)<|quad_end|>`.
Decode with `skip_special_tokens=False` to keep these markers.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

from qwen2vl.tokenizer import (
    BOX_END,
    BOX_START,
    OBJECT_REF_END,
    OBJECT_REF_START,
    QUAD_END,
    QUAD_START,
)

SCALE = 1000  # coordinates are integers in [0, SCALE)

Point = tuple[int, int]

_POINT = re.compile(r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")
_ITEM = re.compile(
    re.escape(OBJECT_REF_START) + r"(?P<ref>.*?)" + re.escape(OBJECT_REF_END)
    + "|" + re.escape(BOX_START) + r"(?P<box>.*?)" + re.escape(BOX_END)
    + "|" + re.escape(QUAD_START) + r"(?P<quad>.*?)" + re.escape(QUAD_END),
    re.DOTALL,
)  # fmt: skip


@dataclass(frozen=True)
class Box:
    """Axis-aligned box, corners in [0, 1000) coordinates."""

    x1: int
    y1: int
    x2: int
    y2: int

    def to_pixels(self, width: int, height: int) -> tuple[float, float, float, float]:
        """Corners in pixels of the original image."""
        return (
            self.x1 / SCALE * width,
            self.y1 / SCALE * height,
            self.x2 / SCALE * width,
            self.y2 / SCALE * height,
        )

    @classmethod
    def from_pixels(
        cls, x1: float, y1: float, x2: float, y2: float, width: int, height: int
    ) -> Box:
        """The inverse of `to_pixels`, rounded and clamped to [0, 999] (for training targets)."""
        return cls(_norm(x1, width), _norm(y1, height), _norm(x2, width), _norm(y2, height))


@dataclass(frozen=True)
class Quad:
    """Four corners in [0, 1000) coordinates (rotated text boxes)."""

    points: tuple[Point, Point, Point, Point]

    def to_pixels(self, width: int, height: int) -> list[tuple[float, float]]:
        return [(x / SCALE * width, y / SCALE * height) for x, y in self.points]


@dataclass
class GroundedObject:
    """A referred object: its label (None for boxes written without a reference) and shapes."""

    label: str | None
    boxes: list[Box] = field(default_factory=list)
    quads: list[Quad] = field(default_factory=list)


def _norm(value: float, size: int) -> int:
    return min(SCALE - 1, max(0, round(value / size * SCALE)))


def _points(body: str) -> list[Point]:
    return [(round(float(x)), round(float(y))) for x, y in _POINT.findall(body)]


# -- parsing ------------------------------------------------------------------------------------


def parse_grounding(text: str) -> list[GroundedObject]:
    """Objects in generated text, in order of appearance.

    Boxes and quads attach to the reference right before them (only whitespace or commas
    between); others get label None. A box body holding several point pairs gives several
    boxes; malformed bodies (odd point count, no points) are skipped, as the model's text
    around them is still useful.
    """
    objects: list[GroundedObject] = []
    current: GroundedObject | None = None
    pos = 0
    for m in _ITEM.finditer(text):
        adjacent = current is not None and not text[pos : m.start()].strip(" \t\r\n,;")
        pos = m.end()
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


def grounding_prompt(label: str) -> str:
    """A user request for the box of `label` (plain text: user text never holds the markers)."""
    return f"Find the {label} in the image and output its bounding box."


# -- drawing ------------------------------------------------------------------------------------

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
)  # fmt: skip


def draw_objects(
    image: Image.Image, objects: Sequence[GroundedObject], *, line_width: int = 3
) -> Image.Image:
    """A copy of `image` (original size) with each object's shapes and label drawn on it.

    Colours follow the order labels first appear, so the same label keeps one colour.
    """
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    colours: dict[str | None, tuple[int, int, int]] = {}
    for obj in objects:
        colour = colours.setdefault(obj.label, PALETTE[len(colours) % len(PALETTE)])
        for box in obj.boxes:
            x1, y1, x2, y2 = box.to_pixels(*canvas.size)
            draw.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)),
                           outline=colour, width=line_width)  # fmt: skip
            _label(draw, font, obj.label, (min(x1, x2), min(y1, y2)), colour)
        for quad in obj.quads:
            corners = quad.to_pixels(*canvas.size)
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
