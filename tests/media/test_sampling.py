"""Video frame choice and size follow qwen-vl-utils; the token cap always holds.

`qwen_reference` below restates qwen-vl-utils' documented rules (vision_process.py:
smart_nframes, calculate_video_frame_range, the torch.linspace indices and the per-frame
max_pixels of fetch_video, Qwen2.5-VL/Qwen3-VL era) as a tiny independent reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from qwen2vl.errors import MediaError
from qwen2vl.media.resize import smart_resize
from qwen2vl.media.sampling import VideoSettings, plan_frames

VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


def qwen_reference(total_frames, video_fps, height, width, ele):
    """(frame indices, (resized_h, resized_w)) by qwen-vl-utils' rules; raises where it does."""
    start, end = 0, total_frames - 1
    if "video_start" in ele or "video_end" in ele:
        duration = total_frames / video_fps
        if "video_start" in ele:
            start = math.ceil(max(0.0, min(ele["video_start"], duration)) * video_fps)
        if "video_end" in ele:
            end = min(math.floor(max(0.0, min(ele["video_end"], duration)) * video_fps), end)
        if start >= end:
            raise ValueError("invalid time range")
    total = end - start + 1
    if "nframes" in ele:
        nframes = round(ele["nframes"] / 2) * 2
    else:
        min_frames = math.ceil(ele.get("min_frames", 4) / 2) * 2
        max_frames = math.floor(ele.get("max_frames", min(768, total)) / 2) * 2
        nframes = total / video_fps * ele.get("fps", 2.0)
        nframes = math.floor(min(min(max(nframes, min_frames), max_frames), total) / 2) * 2
    if not 2 <= nframes <= total:
        raise ValueError(f"nframes should in interval [2, {total}], but got {nframes}.")
    idx = torch.linspace(start, end, nframes).round().long().tolist()
    min_pixels = ele.get("min_pixels", VIDEO_MIN_PIXELS)
    total_pixels = ele.get("total_pixels", VIDEO_TOTAL_PIXELS)
    max_pixels = max(min(VIDEO_MAX_PIXELS, total_pixels / nframes * 2), int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    if "resized_height" in ele:
        size = smart_resize(ele["resized_height"], ele["resized_width"], 28)
    else:
        size = smart_resize(height, width, 28, min_pixels=min_pixels, max_pixels=max_pixels)
    return idx, size


def ours(total_frames, video_fps, height, width, ele, max_tokens=None):
    settings = VideoSettings(max_tokens=max_tokens, **ele)
    return plan_frames(
        height=height,
        width=width,
        total_frames=total_frames,
        video_fps=video_fps,
        settings=settings,
    )


CASES = {
    "fps_only_default": (300, 30.0, 480, 640, {}),
    "fps_1": (900, 30.0, 720, 1280, {"fps": 1.0}),
    "fps_short_clip_min_frames": (20, 25.0, 240, 320, {}),
    "fps_long_max_frames": (108000, 30.0, 1080, 1920, {}),
    "fps_fractional_rate": (1001, 29.97, 360, 640, {"fps": 3.0}),
    "nframes": (300, 30.0, 480, 640, {"nframes": 16}),
    "nframes_odd_rounds_half_even": (300, 30.0, 480, 640, {"nframes": 5}),
    "total_pixels": (600, 30.0, 1080, 1920, {"total_pixels": 20480 * 28 * 28}),
    "total_pixels_tiny_hits_floor": (600, 30.0, 1080, 1920, {"total_pixels": 1000}),
    "max_pixels_lower": (300, 30.0, 1080, 1920, {"max_pixels": 64 * 28 * 28}),
    "min_max_pixels": (300, 30.0, 1080, 1920, {"min_pixels": 50000, "max_pixels": 90000}),
    "video_start_end": (300, 30.0, 480, 640, {"video_start": 2.5, "video_end": 7.2}),
    "video_start_only": (300, 30.0, 480, 640, {"video_start": 4.0}),
    "video_end_past_duration": (300, 30.0, 480, 640, {"video_end": 99.0}),
    "resized": (300, 30.0, 480, 640, {"resized_height": 300, "resized_width": 500}),
    "min_max_frames": (3000, 30.0, 480, 640, {"fps": 4.0, "min_frames": 6, "max_frames": 30}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_indices_and_sizes_match_qwen_vl_utils(name):
    total, fps, height, width, ele = CASES[name]
    expected_idx, expected_size = qwen_reference(total, fps, height, width, ele)
    plan = ours(total, fps, height, width, ele)
    assert list(plan.frame_indices) == expected_idx
    assert (plan.resized_height, plan.resized_width) == expected_size
    assert plan.grid_thw == (len(expected_idx) // 2, expected_size[0] // 14, expected_size[1] // 14)
    assert plan.timestamps == tuple(i / fps for i in expected_idx)
    assert plan.sample_fps == pytest.approx(
        len(expected_idx) / (plan.end_frame - plan.start_frame + 1) * fps
    )


def test_nframes_above_frame_count_reads_all_frames_and_pads_where_qwen_raises():
    with pytest.raises(ValueError):
        qwen_reference(5, 10.0, 48, 64, {"nframes": 8})
    plan = ours(5, 10.0, 48, 64, {"nframes": 8})
    assert plan.frame_indices == (0, 1, 2, 3, 4, 4)  # odd count: last frame repeated
    assert plan.grid_thw[0] == 3


def test_single_frame_video_becomes_one_temporal_patch():
    plan = ours(1, 30.0, 48, 64, {})
    assert plan.frame_indices == (0, 0) and plan.grid_thw[0] == 1


def test_empty_time_range_is_a_media_error():
    with pytest.raises(ValueError):
        qwen_reference(300, 30.0, 48, 64, {"video_start": 8.0, "video_end": 3.0})
    with pytest.raises(MediaError, match="empty time range"):
        ours(300, 30.0, 48, 64, {"video_start": 8.0, "video_end": 3.0})


def test_frame_list_is_taken_as_already_sampled():
    settings = VideoSettings(fps=4.0, max_tokens=None)
    plan = plan_frames(
        height=48, width=64, total_frames=5, video_fps=0.0, settings=settings, presampled=True
    )
    assert plan.frame_indices == (0, 1, 2, 3, 4, 4)
    assert plan.timestamps == (0.0, 0.25, 0.5, 0.75, 1.0, 1.0)
    assert plan.sample_fps == 4.0


@pytest.mark.parametrize(
    "total,fps,height,width,ele,max_tokens",
    [
        (108000, 30.0, 1080, 1920, {}, 16384),  # 768 frames: fewer pixels, then fewer frames
        (3000, 30.0, 720, 1280, {"fps": 4.0}, 2000),
        (600, 30.0, 720, 1280, {}, 8000),  # fewer pixels suffice
        (300, 30.0, 100, 19000, {"min_pixels": 28 * 28}, 40),  # thin: one temporal patch
        (300, 30.0, 480, 640, {"resized_height": 1000, "resized_width": 1000}, 1000),
    ],
)
def test_token_cap_is_never_exceeded(total, fps, height, width, ele, max_tokens):
    uncapped = ours(total, fps, height, width, ele)
    plan = ours(total, fps, height, width, ele, max_tokens=max_tokens)
    assert uncapped.tokens > max_tokens
    assert plan.capped and plan.uncapped_tokens == uncapped.tokens
    assert plan.tokens <= max_tokens
    t, h, w = plan.grid_thw
    assert plan.tokens == t * h * w // 4 and len(plan.frame_indices) == 2 * t
    assert list(plan.frame_indices) == sorted(plan.frame_indices)


def test_token_cap_shrinks_pixels_first_and_keeps_frames_when_that_suffices():
    uncapped = ours(600, 30.0, 720, 1280, {})
    plan = ours(600, 30.0, 720, 1280, {}, max_tokens=8000)
    assert plan.frame_indices == uncapped.frame_indices
    assert plan.resized_height < uncapped.resized_height and plan.tokens <= 8000


def test_token_cap_prefers_min_pixels_before_dropping_frames():
    plan = ours(108000, 30.0, 1080, 1920, {}, max_tokens=16384)
    assert plan.resized_height * plan.resized_width >= VIDEO_MIN_PIXELS * 0.9
    assert len(plan.frame_indices) < 768


def test_token_cap_too_small_for_any_plan_is_a_media_error():
    with pytest.raises(MediaError, match="max_tokens"):
        ours(300, 30.0, 28, 5600, {}, max_tokens=3)


def test_under_the_cap_nothing_changes():
    plan = ours(300, 30.0, 480, 640, {}, max_tokens=16384)
    assert not plan.capped and plan.tokens == plan.uncapped_tokens


@pytest.mark.parametrize(
    "fields,key",
    [
        ({"fps": 0}, "fps"),
        ({"fps": "2"}, "fps"),
        ({"nframes": 0}, "nframes"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"total_pixels": -1}, "total_pixels"),
        ({"min_frames": -1}, "min_frames"),
        ({"video_end": float("inf")}, "video_end"),
        ({"max_pixels": None}, "max_pixels"),
        ({"image_std": (1.0, 1.0, 0.0)}, "image_std"),
    ],
)
def test_bad_settings_are_a_media_error_naming_the_field(fields, key):
    with pytest.raises(MediaError, match=key) as caught:
        VideoSettings(**fields)
    assert caught.value.param == key
