"""process_image equals transformers' PIL-backend Qwen2-VL image processor (max |diff| <= 1e-5).

Modes both sides convert alike (RGB, RGBA/LA/P-with-transparency on white, L, P, CMYK, 1) are
compared from the same input. 16-bit and float modes we scale to 8 bits by design where the
reference clips, so those compare our RGB (load_image) through the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.media import ImageSettings, load_image, process_image

pil_backend = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

RNG = np.random.default_rng(1234)


def noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    shape = (height, width) if channels == 1 else (height, width, channels)
    return RNG.integers(0, 256, shape, dtype=np.uint8)


def smooth(height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], -1
    ).astype(np.uint8)


def palette_with_transparency() -> Image.Image:
    image = Image.fromarray(noise(50, 70)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 3
    return image


SAME_INPUT = {
    "rgb_448": lambda: Image.fromarray(noise(448, 448)),
    "rgb_720p": lambda: Image.fromarray(smooth(720, 1280)),
    "rgb_large_2000x1500": lambda: Image.fromarray(smooth(1500, 2000)),
    "rgb_odd_33x77": lambda: Image.fromarray(noise(33, 77)),
    "rgb_1x1": lambda: Image.fromarray(noise(1, 1)),
    "rgb_14x14": lambda: Image.fromarray(noise(14, 14)),
    "rgb_28x28": lambda: Image.fromarray(noise(28, 28)),
    "rgb_thin_3x600": lambda: Image.fromarray(noise(3, 600)),
    "rgb_thin_600x3": lambda: Image.fromarray(noise(600, 3)),
    "rgb_ratio_200": lambda: Image.fromarray(noise(10, 2000)),
    "rgba": lambda: Image.fromarray(noise(90, 120, 4)),
    "la": lambda: Image.fromarray(noise(64, 48, 4)).convert("LA"),
    "l": lambda: Image.fromarray(noise(100, 80, 1)),
    "p": lambda: Image.fromarray(noise(60, 90)).convert("P", palette=Image.Palette.ADAPTIVE),
    "p_transparency": palette_with_transparency,
    "cmyk": lambda: Image.fromarray(noise(77, 55)).convert("CMYK"),
    "bilevel_1": lambda: Image.fromarray(noise(40, 40, 1)).convert("1"),
    "numpy_hwc": lambda: noise(120, 160),
    "numpy_hw_gray": lambda: noise(70, 50, 1),
}
OWN_CONVERSION = {
    "i16": lambda: Image.fromarray(noise(64, 64, 1).astype(np.uint16) * 257),
    "i32": lambda: Image.fromarray(noise(40, 60, 1).astype(np.int32) * 200),
    "f_unit": lambda: Image.fromarray(noise(30, 30, 1).astype(np.float32) / 255),
}
BOUNDS = [(56 * 56, 28 * 28 * 1280), (4 * 28 * 28, 256 * 28 * 28)]


def reference(image, min_pixels: int, max_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    processor = pil_backend.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    out = processor(images=image, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"][0]


def assert_same(image, ref_input, min_pixels, max_pixels):
    pixel_values, grid_thw = process_image(
        image, ImageSettings(min_pixels=min_pixels, max_pixels=max_pixels)
    )
    ref_values, ref_grid = reference(ref_input, min_pixels, max_pixels)
    assert grid_thw.dtype == torch.long and grid_thw.shape == (3,)
    assert grid_thw.tolist() == ref_grid.tolist()
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == ref_values.shape
    assert (pixel_values - ref_values).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bounds", BOUNDS, ids=["default", "small"])
@pytest.mark.parametrize("name", sorted(SAME_INPUT))
def test_pixels_match_transformers(name, bounds):
    image = SAME_INPUT[name]()
    # The reference wants HxWx1 for grayscale arrays; the pixels are the same.
    ref_input = image[..., None] if isinstance(image, np.ndarray) and image.ndim == 2 else image
    assert_same(image, ref_input, *bounds)


@pytest.mark.parametrize("name", sorted(OWN_CONVERSION))
def test_high_depth_modes_match_transformers_after_our_rgb(name):
    image = OWN_CONVERSION[name]()
    rgb = load_image(image)
    assert rgb.mode == "RGB"
    assert_same(image, rgb, *BOUNDS[0])


def test_forced_size_is_snapped_to_the_factor_like_qwen_vl_utils():
    image = Image.fromarray(smooth(300, 500))
    pixel_values, grid_thw = process_image(
        image, ImageSettings(resized_height=280, resized_width=430)
    )
    assert grid_thw.tolist() == [1, 20, 30]  # 430 -> round(430/28)*28 = 420
    assert pixel_values.shape == (600, 3 * 2 * 14 * 14)
