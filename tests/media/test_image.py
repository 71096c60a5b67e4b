"""ImageSettings: checked once, naming the field at fault; the defaults are the short call."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.errors import MediaError
from qwen2vl.media import ImageSettings, MediaConfig, plan_image, process_image


@pytest.mark.parametrize(
    "fields,key",
    [
        ({"max_pixels": "big"}, "max_pixels"),
        ({"min_pixels": 0}, "min_pixels"),
        ({"patch_size": 14.0}, "patch_size"),
        ({"merge_size": True}, "merge_size"),
        ({"image_std": (0.3, 0.0, 0.3)}, "image_std"),
        ({"image_mean": (0.5, 0.5)}, "image_mean"),
    ],
)
def test_bad_settings_are_a_media_error_naming_the_field(fields, key):
    with pytest.raises(MediaError, match=key) as caught:
        ImageSettings(**fields)
    assert caught.value.param == key


def test_forced_size_needs_both_sides():
    with pytest.raises(MediaError, match="give both"):
        ImageSettings(resized_height=280)


def test_settings_take_numpy_integers():
    settings = ImageSettings(max_pixels=np.int64(28 * 28 * 64))
    assert plan_image((300, 400), settings).tokens <= 64


def test_default_call_uses_the_official_defaults():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), np.uint8))
    pixel_values, grid_thw = process_image(image)
    expected, expected_grid = process_image(image, MediaConfig().image_settings())
    assert torch.equal(pixel_values, expected) and torch.equal(grid_thw, expected_grid)
    assert plan_image(image).grid_thw == tuple(grid_thw.tolist())
