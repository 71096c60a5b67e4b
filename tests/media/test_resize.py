"""smart_resize equals transformers' Qwen2-VL smart_resize; where that raises, MediaError."""

from __future__ import annotations

import itertools

import pytest

from qwen2vl.errors import MediaError
from qwen2vl.media import smart_resize

reference = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")

SIDES = [1, 2, 13, 14, 15, 27, 28, 29, 41, 42, 43, 56, 70, 99, 224, 333, 448, 719, 1080, 1920, 4000]
BOUNDS = [
    (56 * 56, 28 * 28 * 1280),
    (4 * 28 * 28, 16384 * 28 * 28),
    (128 * 28 * 28, 768 * 28 * 28),
    (28 * 28, 28 * 28),
    (1000, 5000),
]


@pytest.mark.parametrize("min_pixels,max_pixels", BOUNDS)
def test_smart_resize_matches_transformers_on_a_sweep(min_pixels, max_pixels):
    for height, width in itertools.product(SIDES, SIDES):
        try:
            expected = reference.smart_resize(height, width, 28, min_pixels, max_pixels)
        except ValueError:
            with pytest.raises(MediaError):
                smart_resize(height, width, 28, min_pixels, max_pixels)
            continue
        assert smart_resize(height, width, 28, min_pixels, max_pixels) == expected, (height, width)


def test_round_half_to_even_like_the_reference():
    # 42/28 = 1.5 -> 2 and 70/28 = 2.5 -> 2: Python's banker's rounding, kept on purpose.
    assert smart_resize(42, 70, 28, 1, 10**9) == (56, 56)
    assert smart_resize(42, 70, 28, 1, 10**9) == reference.smart_resize(42, 70, 28, 1, 10**9)


def test_aspect_ratio_over_200_is_a_media_error_with_the_sizes():
    with pytest.raises(MediaError, match=r"201\.0.*1x201"):
        smart_resize(201, 1)
    assert smart_resize(200, 1) == reference.smart_resize(200, 1, 28, 56 * 56, 28 * 28 * 16384)


@pytest.mark.parametrize("height,width", [(1, 1), (1, 150), (10, 1000), (5, 7)])
def test_tiny_and_thin_sides_never_round_to_zero(height, width):
    h, w = smart_resize(height, width)
    assert h >= 28 and w >= 28 and h % 28 == 0 and w % 28 == 0


def test_zero_side_or_nonpositive_min_pixels_is_a_media_error():
    with pytest.raises(MediaError, match="zero side"):
        smart_resize(0, 10)
    # The reference returns a 0 side here (round(10/28) = 0 and no min-pixel branch).
    assert 0 in reference.smart_resize(10, 1000, 28, 0, 10**6)
    with pytest.raises(MediaError, match="min_pixels"):
        smart_resize(10, 1000, 28, 0, 10**6)


def test_other_factors():
    for factor in (14, 32, 56):
        for height, width in [(100, 200), (1080, 1920), (33, 77)]:
            ref = reference.smart_resize(height, width, factor, 56 * 56, 28 * 28 * 1280)
            assert smart_resize(height, width, factor, 56 * 56, 28 * 28 * 1280) == ref
