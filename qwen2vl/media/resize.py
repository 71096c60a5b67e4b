"""Target sizes for images and video frames: `smart_resize` and the by-factor rounding helpers.

A side is resized to a multiple of `factor` = patch_size * merge_size (28 for Qwen2-VL) so the
frame tiles exactly into merge windows, keeping the pixel count within [min_pixels, max_pixels]
and the aspect ratio as close as the rounding allows.
"""

from __future__ import annotations

import math

from PIL import Image

from qwen2vl.errors import MediaError

MAX_ASPECT_RATIO = 200


def round_by_factor(number: float, factor: int) -> int:
    """Nearest multiple of factor; ties go to the even multiple (Python round), as the reference."""
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 56 * 56,
    max_pixels: int = 28 * 28 * 16384,
) -> tuple[int, int]:
    """(h, w), both multiples of factor, h*w within [min_pixels, max_pixels] where reachable.

    Same numbers as transformers' `smart_resize` (Qwen2-VL image processor), including its
    round-half-to-even (42 -> 56, 70 -> 56 for factor 28). Where the reference raises
    (aspect ratio over 200, a zero side) or would return a zero side (min_pixels <= 0 and a side
    under factor/2), this raises MediaError instead.

    Known difference from qwen-vl-utils' copy: that one starts from max(factor, round(side)), so a
    side under 14 px can get a different size when the min-pixel branch is not taken.
    """
    if height < 1 or width < 1:
        raise MediaError(f"image has a zero side: {width}x{height} (width x height)")
    if factor < 1 or max_pixels < 1:
        raise MediaError(f"bad resize bounds: factor={factor}, max_pixels={max_pixels}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(
            f"aspect ratio {ratio:.1f} of a {width}x{height} (width x height) image is over the "
            f"limit of {MAX_ASPECT_RATIO}; crop or pad it first"
        )
    h_bar = round_by_factor(height, factor)
    w_bar = round_by_factor(width, factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, floor_by_factor(height / beta, factor))
        w_bar = max(factor, floor_by_factor(width / beta, factor))
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    if h_bar < factor or w_bar < factor:
        # Only reachable with min_pixels <= 0: the reference would hand back a zero side.
        raise MediaError(
            f"{width}x{height} (width x height) resizes to a zero side with min_pixels="
            f"{min_pixels}; use min_pixels >= {factor * factor}"
        )
    return h_bar, w_bar


def resize_rgb(image: Image.Image, height: int, width: int) -> Image.Image:
    """Bicubic PIL resize, the filter the reference image processor uses (PIL takes (w, h))."""
    return image.resize((width, height), resample=Image.Resampling.BICUBIC)
