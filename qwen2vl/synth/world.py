"""The synthetic visual world: a few colours and shapes drawn flat on a grey canvas, which is
lit unevenly (red rises left to right, green top to bottom) so a patch's colour tells where it is.

Everything is drawn without antialiasing from integer pixel boxes, so an object's box is known
exactly (corners are continuous pixel coordinates: a shape filling pixels x0..x1 spans x0..x1+1).
Randomness comes only from the numpy Generator passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 190, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star")
MIN_SIDE, MAX_SIDE = 56, 112  # image sides in pixels: varied so dynamic resolution is exercised
BACKGROUND_MAX = 70  # background grey level 0..70: every colour above stands out on it
CELL = 28  # the pixels one LLM token stands for: 14-pixel patches, merged 2 x 2
GLYPH_BOX = (6, 9)  # a character's box in Pillow's default font, before scaling
SHADE = 48  # how far red (left to right) and green (top to bottom) rise across a canvas


@dataclass(frozen=True)
class Shape:
    """A filled shape inside the inclusive pixel box (x0, y0)..(x1, y1)."""

    kind: str
    colour: str
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def label(self) -> str:
        return f"{self.colour} {self.kind}"

    @property
    def corners(self) -> tuple[int, int, int, int]:
        """Continuous pixel corners (exclusive end), as `Box.from_pixels` takes them."""
        return self.x0, self.y0, self.x1 + 1, self.y1 + 1

    def moved(self, dx: int, dy: int) -> Shape:
        x0, y0, x1, y1 = self.x0 + dx, self.y0 + dy, self.x1 + dx, self.y1 + dy
        return Shape(self.kind, self.colour, x0, y0, x1, y1)


def _unit_polygon(kind: str) -> list[tuple[float, float]]:
    if kind == "square":
        return [(0, 0), (1, 0), (1, 1), (0, 1)]
    if kind == "triangle":
        return [(0.5, 0), (1, 1), (0, 1)]
    if kind == "diamond":
        return [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]
    if kind == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        return pts
    raise ValueError(f"unknown shape kind {kind!r}")


def polygon(shape: Shape) -> list[tuple[float, float]]:
    """The shape's polygon, stretched so its extremes touch the box on all four sides."""
    pts = _unit_polygon(shape.kind)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
    w, h = shape.x1 - shape.x0, shape.y1 - shape.y0
    return [
        (shape.x0 + (x - lo_x) / (hi_x - lo_x) * w, shape.y0 + (y - lo_y) / (hi_y - lo_y) * h)
        for x, y in pts
    ]


def draw_shape(draw: ImageDraw.ImageDraw, shape: Shape) -> None:
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((shape.x0, shape.y0, shape.x1, shape.y1), fill=fill)
    else:
        draw.polygon(polygon(shape), fill=fill)


def canvas(width: int, height: int, grey: int) -> Image.Image:
    """A `grey` canvas lit unevenly: red rises by SHADE from the left edge to the right, green
    from the top to the bottom. A photo tells a ViT where it looks through its content; a flat
    canvas cannot, because Qwen2-VL's vision tower has relative rotary only and every patch of a
    flat region then has the same features wherever it lies (measured: a head reading a token's
    place stayed at chance, L1 0.22). The ramps give every patch its absolute place (L1 0.03)."""
    x = np.rint(np.linspace(0, SHADE, width)).astype(np.uint8)
    y = np.rint(np.linspace(0, SHADE, height)).astype(np.uint8)
    rgb = np.full((height, width, 3), grey, dtype=np.uint8)
    rgb[:, :, 0] += x[None, :]
    rgb[:, :, 1] += y[:, None]
    return Image.fromarray(rgb, "RGB")


def render(width: int, height: int, grey: int, shapes: list[Shape]) -> Image.Image:
    image = canvas(width, height, grey)
    draw = ImageDraw.Draw(image)
    for shape in shapes:
        draw_shape(draw, shape)
    return image


def random_size(
    rng: np.random.Generator, lo: int = MIN_SIDE, hi: int = MAX_SIDE
) -> tuple[int, int]:
    """(width, height), each side uniform in lo..hi, so aspect ratios vary up to 4:1."""
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def random_grey(rng: np.random.Generator) -> int:
    return int(rng.integers(0, BACKGROUND_MAX + 1))


def random_look(rng: np.random.Generator) -> tuple[str, str]:
    """(kind, colour)."""
    return str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))


def place(
    rng: np.random.Generator,
    width: int,
    height: int,
    looks: list[tuple[str, str]],
    *,
    min_size: int = 12,
    max_size: int | None = None,
) -> list[Shape]:
    """Shapes that never touch: each gets its own cell of a grid and a random spot inside it.

    Raises ValueError when the grid has fewer cells than shapes (the canvas is too small)."""
    n = len(looks)
    cols = max(1, math.ceil(math.sqrt(n * width / height)))
    rows = max(1, math.ceil(n / cols))
    cell_w, cell_h = width // cols, height // rows
    top = min(cell_w, cell_h) - 2  # a one-pixel gap on each side of the cell
    if top < min_size or cols * rows < n:
        raise ValueError(f"{n} shapes of {min_size}+ px do not fit a {width}x{height} canvas")
    cells = rng.permutation(cols * rows)[:n]
    shapes = []
    for (kind, colour), cell in zip(looks, cells, strict=True):
        size = int(rng.integers(min_size, min(top, max_size or top) + 1))
        r, c = divmod(int(cell), cols)
        x0 = c * cell_w + 1 + int(rng.integers(0, cell_w - 2 - size + 1))
        y0 = r * cell_h + 1 + int(rng.integers(0, cell_h - 2 - size + 1))
        shapes.append(Shape(kind, colour, x0, y0, x0 + size - 1, y0 + size - 1))
    return shapes


def glyph_mask(char: str, scale: int) -> Image.Image:
    """One character of Pillow's built-in bitmap font (same on every machine) as a 0/255 mask:
    the font's 6 x 9 pixel box that holds the ink of every letter and digit (descenders
    included), scaled up by `scale` with nearest-neighbour."""
    font = ImageFont.load_default_imagefont()
    mask = Image.new("L", GLYPH_BOX, 0)
    ImageDraw.Draw(mask).text((0, -2), char, fill=255, font=font)  # rows 0-1 of a line: no ink
    return mask.resize((GLYPH_BOX[0] * scale, GLYPH_BOX[1] * scale), Image.Resampling.NEAREST)


def shape_mask(shape: Shape, width: int, height: int) -> Image.Image:
    """The shape's pixels as a 0/255 mask of the image size (drawn as `render` draws it)."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    if shape.kind == "circle":
        draw.ellipse((shape.x0, shape.y0, shape.x1, shape.y1), fill=255)
    else:
        draw.polygon(polygon(shape), fill=255)
    return mask
