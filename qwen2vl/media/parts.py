"""Chat content parts with per-item overrides, the qwen-vl-utils way.

A part looks like {"type": "image", "image": src, "min_pixels": ..., "max_pixels": ...} or
{"type": "video", "video": src_or_frames, "fps": 1.0, "video_start": 3.0, ...}. `image_url`
(a string, or OpenAI's {"url": ...}) stands for `image`. Per-item keys are fields of
ImageSettings / VideoSettings and replace the MediaConfig defaults; a bad value is a MediaError
naming the key; unknown keys are ignored with a warning, as qwen-vl-utils ignores them.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from qwen2vl.errors import MediaError
from qwen2vl.media.config import MediaConfig
from qwen2vl.media.image import (
    ImageInput,
    ImagePlan,
    ImageSettings,
    check_number,
    plan_image,
    process_image,
)
from qwen2vl.media.sampling import VideoPlan, VideoSettings
from qwen2vl.media.source import DEFAULT_ACCESS, MediaAccess
from qwen2vl.media.video import VideoInput, plan_video, process_video

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("min_pixels", "max_pixels", "resized_height", "resized_width")
VIDEO_KEYS = IMAGE_KEYS + (
    "total_pixels",
    "fps",
    "nframes",
    "video_start",
    "video_end",
    "min_frames",
    "max_frames",
    "max_tokens",
)
_IGNORED = ("type", "text", "sample_fps", "image", "image_url", "video")


def part_kind(part: dict[str, Any]) -> str:
    """'image' or 'video'."""
    if "image" in part or "image_url" in part:
        return "image"
    if "video" in part:
        return "video"
    raise MediaError(f"content part has no image, image_url or video: keys {sorted(part)}")


def process_part(
    part: dict[str, Any],
    config: MediaConfig | None = None,
    *,
    access: MediaAccess = DEFAULT_ACCESS,
) -> ImageInput | VideoInput:
    """`process_image` or `process_video` on a content part, its keys over the config defaults."""
    kind, source, settings = _call_args(part, config or MediaConfig())
    run = process_image if kind == "image" else process_video
    return run(source, settings, access=access)


def plan_part(
    part: dict[str, Any],
    config: MediaConfig | None = None,
    *,
    access: MediaAccess = DEFAULT_ACCESS,
) -> ImagePlan | VideoPlan:
    """`plan_image` or `plan_video` on a content part: sizes and tokens without pixels."""
    kind, source, settings = _call_args(part, config or MediaConfig())
    run = plan_image if kind == "image" else plan_video
    return run(source, settings, access=access)


def _call_args(
    part: dict[str, Any], config: MediaConfig
) -> tuple[str, Any, ImageSettings | VideoSettings]:
    kind = part_kind(part)
    allowed = IMAGE_KEYS if kind == "image" else VIDEO_KEYS
    unknown = sorted(k for k in part if k not in allowed and k not in _IGNORED)
    if unknown:
        logger.warning("ignoring unknown %s part keys %s (known: %s)", kind, unknown, allowed)
    overrides = {k: part[k] for k in allowed if part.get(k) is not None}
    if kind == "image":
        source = part["image"] if "image" in part else part["image_url"]
        if isinstance(source, dict):
            source = source.get("url")
        return kind, source, replace(config.image_settings(), **overrides)
    if "fps" in overrides and "nframes" in overrides:
        raise MediaError("a video part takes either fps or nframes, not both")
    source = part["video"]
    if isinstance(source, (list, tuple)) and part.get("sample_fps") is not None:
        check_number("sample_fps", part["sample_fps"], positive=True)
        overrides["fps"] = part["sample_fps"]  # a frame list's own rate (qwen-vl-utils' sample_fps)
    return kind, source, replace(config.video_settings(), **overrides)
