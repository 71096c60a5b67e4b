"""Images to vision patches: plan the size (no pixels), then resize, normalise and patchify.

`plan_image` and `process_image` share `_plan_from_size`, so a token budget computed from the
plan is exactly what processing produces. Numbers match transformers' PIL Qwen2-VL image
processor: bicubic PIL resize, rescale 1/255, CLIP mean/std, official patch order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from qwen2vl.media.sampling import VideoSettings

IMAGE_MIN_PIXELS = 56 * 56
IMAGE_MAX_PIXELS = 28 * 28 * 1280


@dataclass(frozen=True, kw_only=True)
class ImageSettings:
    """How an image becomes patches: its pixel bounds (or a forced size), then the checkpoint's
    patch geometry and normalisation. `MediaConfig.image_settings()` gives a checkpoint's.

    resized_height/resized_width (both or neither) force a size, snapped to a multiple of
    patch_size*merge_size as qwen-vl-utils does; otherwise the size keeps the aspect ratio
    within [min_pixels, max_pixels]. Field names are the content-part keys of qwen-vl-utils.
    """

    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    resized_height: int | None = None
    resized_width: int | None = None
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        check_frame_settings(self)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


def check_frame_settings(s: ImageSettings | VideoSettings) -> None:
    """The checks image and video settings share: pixel bounds, forced size, patch geometry and
    normalisation. MediaError names the field, which is also the content-part key that set it."""
    for name in ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size"):
        check_int(name, getattr(s, name))
    for name in ("resized_height", "resized_width"):
        check_int(name, getattr(s, name), optional=True)
    if (s.resized_height is None) != (s.resized_width is None):
        missing = "resized_width" if s.resized_width is None else "resized_height"
        raise MediaError("give both resized_height and resized_width, or neither", param=missing)
    for name in ("image_mean", "image_std"):
        value = getattr(s, name)
        if not (isinstance(value, (tuple, list)) and len(value) == 3):
            raise MediaError(
                f"{name} must be 3 numbers, one per channel, got {value!r}", param=name
            )
        for v in value:
            check_number(name, v, positive=name == "image_std")


def check_int(name: str, value: Any, *, least: int = 1, optional: bool = False) -> None:
    """MediaError naming the setting unless value is an integer >= least (or None if optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        raise MediaError(f"{name} must be an integer >= {least}, got {value!r}", param=name)


def check_number(name: str, value: Any, *, positive: bool = False, optional: bool = False) -> None:
    """MediaError naming the setting unless value is a finite number (> 0 when positive)."""
    if value is None and optional:
        return
    ok = not isinstance(value, bool) and isinstance(value, Real) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        rule = "a finite number > 0" if positive else "a finite number"
        raise MediaError(f"{name} must be {rule}, got {value!r}", param=name)


DEFAULT_IMAGE_SETTINGS = ImageSettings()


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
    settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
    *,
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
    return _plan_from_size(height, width, settings)


@dataclass(frozen=True)
class ImageInput:
    """A processed image. Unpacks as `pixel_values, grid_thw = process_image(...)`."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    plan: ImagePlan

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.pixel_values, self.grid_thw))


def process_image(
    image: ImageSource,
    settings: ImageSettings = DEFAULT_IMAGE_SETTINGS,
    *,
    access: MediaAccess = DEFAULT_ACCESS,
) -> ImageInput:
    """An image -> (pixel_values [t*h*w, 3*Tp*P*P] float32, grid_thw LongTensor [3] = (1, h, w)),
    with its `plan` (the sizes as sent and as resized) beside them.

    The image counts as Tp identical frames.
    """
    opened = open_image(image, access)
    rgb = None
    try:
        _plan_from_size(*oriented_size(opened), settings)  # refuse bad shapes before decoding
        rgb = decode_rgb(opened)
    finally:
        if opened is not image and opened is not rgb:
            opened.close()
    plan = _plan_from_size(rgb.height, rgb.width, settings)
    pixels = np.asarray(resize_rgb(rgb, plan.resized_height, plan.resized_width))
    pixel_values = patchify_image(
        pixels,
        normalize_table(tuple(settings.image_mean), tuple(settings.image_std)),
        patch_size=settings.patch_size,
        merge_size=settings.merge_size,
        temporal_patch_size=settings.temporal_patch_size,
    )
    return ImageInput(pixel_values, torch.tensor(plan.grid_thw, dtype=torch.long), plan)


def _plan_from_size(height: int, width: int, s: ImageSettings) -> ImagePlan:
    if s.resized_height is not None:
        # A forced size is only snapped to the factor, within qwen-vl-utils' default bounds.
        size = smart_resize(s.resized_height, s.resized_width, s.factor)
    else:
        size = smart_resize(
            height, width, s.factor, min_pixels=s.min_pixels, max_pixels=s.max_pixels
        )
    grid = (1, size[0] // s.patch_size, size[1] // s.patch_size)
    return ImagePlan(height, width, size[0], size[1], grid, grid[1] * grid[2] // s.merge_size**2)
