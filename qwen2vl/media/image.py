"""Images to vision patches: plan the size (no pixels), then resize, normalise and patchify.

`plan_image` and `process_image` share `_plan_from_size`, so a token budget computed from the
plan is exactly what processing produces. Numbers match transformers' PIL Qwen2-VL image
processor: bicubic PIL resize, rescale 1/255, CLIP mean/std, official patch order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from qwen2vl.errors import MediaError
from qwen2vl.media.patches import CLIP_MEAN, CLIP_STD, normalize_table, patchify_image
from qwen2vl.media.resize import resize_rgb, smart_resize
from qwen2vl.media.source import (
    DEFAULT_ACCESS,
    ImageSource,
    MediaAccess,
    decode_rgb,
    open_image,
    oriented_size,
)

IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280


@dataclass(frozen=True)
class ImagePlan:
    """What an image becomes. Sizes in pixels; grid_thw in patches; tokens after the MxM merge."""

    height: int
    width: int
    resized_height: int
    resized_width: int
    grid_thw: tuple[int, int, int]
    tokens: int

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


def plan_image(
    image: ImageSource | tuple[int, int],
    *,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    resized_height: int | None = None,
    resized_width: int | None = None,
    patch_size: int = 14,
    merge_size: int = 2,
    access: MediaAccess = DEFAULT_ACCESS,
) -> ImagePlan:
    """The resized size, patch grid and LLM token count of an image, without decoding it.

    `image` is any `load_image` source (only its header is read) or a (height, width) pair.
    """
    if isinstance(image, tuple):
        height, width = image
    else:
        opened = open_image(image, access)
        try:
            height, width = oriented_size(opened)
        finally:
            if opened is not image:
                opened.close()
    return _plan_from_size(
        height,
        width,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        resized_height=resized_height,
        resized_width=resized_width,
        patch_size=patch_size,
        merge_size=merge_size,
    )


def process_image(
    image: ImageSource,
    *,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
    resized_height: int | None = None,
    resized_width: int | None = None,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    image_mean: tuple[float, ...] = CLIP_MEAN,
    image_std: tuple[float, ...] = CLIP_STD,
    access: MediaAccess = DEFAULT_ACCESS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """An image -> (pixel_values [t*h*w, 3*Tp*P*P] float32, grid_thw LongTensor [3] = (1, h, w)).

    The image counts as Tp identical frames. resized_height/resized_width (both or neither) force
    a size, snapped to a multiple of patch_size*merge_size as qwen-vl-utils does.
    """
    sizing = dict(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        resized_height=resized_height,
        resized_width=resized_width,
        patch_size=patch_size,
        merge_size=merge_size,
    )
    opened = open_image(image, access)
    rgb = None
    try:
        _plan_from_size(*oriented_size(opened), **sizing)  # refuse bad shapes before decoding
        rgb = decode_rgb(opened)
    finally:
        if opened is not image and opened is not rgb:
            opened.close()
    plan = _plan_from_size(rgb.height, rgb.width, **sizing)
    pixels = np.asarray(resize_rgb(rgb, plan.resized_height, plan.resized_width))
    table = normalize_table(tuple(image_mean), tuple(image_std))
    pixel_values = patchify_image(
        pixels,
        table,
        patch_size=patch_size,
        merge_size=merge_size,
        temporal_patch_size=temporal_patch_size,
    )
    return pixel_values, torch.tensor(plan.grid_thw, dtype=torch.long)


def forced_size(
    resized_height: int | None, resized_width: int | None, factor: int
) -> tuple[int, int] | None:
    """A caller-forced size snapped to the factor with qwen-vl-utils' default bounds, or None."""
    if resized_height is None and resized_width is None:
        return None
    if resized_height is None or resized_width is None:
        raise MediaError("give both resized_height and resized_width, or neither")
    return smart_resize(resized_height, resized_width, factor)


def _plan_from_size(
    height: int,
    width: int,
    *,
    min_pixels: int,
    max_pixels: int,
    resized_height: int | None,
    resized_width: int | None,
    patch_size: int,
    merge_size: int,
) -> ImagePlan:
    factor = patch_size * merge_size
    size = forced_size(resized_height, resized_width, factor)
    if size is None:
        size = smart_resize(height, width, factor, min_pixels=min_pixels, max_pixels=max_pixels)
    grid = (1, size[0] // patch_size, size[1] // patch_size)
    return ImagePlan(height, width, size[0], size[1], grid, grid[1] * grid[2] // merge_size**2)
