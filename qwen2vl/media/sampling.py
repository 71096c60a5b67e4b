"""Which frames of a video to read and at what size: qwen-vl-utils' rules plus a hard token cap.

All pure functions of the container metadata (frame count, fps, frame size); nothing is decoded.
The rules follow qwen-vl-utils `vision_process.py` (Qwen2.5-VL / Qwen3-VL era):

- frame range: `calculate_video_frame_range` (start = ceil(video_start * fps),
  end = min(floor(video_end * fps), total - 1), inclusive)
- frame count: `smart_nframes` (nframes rounded to FRAME_FACTOR; or duration * fps clamped to
  [min_frames, max_frames] and to the available frames, floored to FRAME_FACTOR)
- indices: `torch.linspace(start, end, n).round().long()`
- per-frame pixels: max_pixels capped by max(min(VIDEO_MAX_PIXELS, total_pixels / n * 2),
  int(min_pixels * 1.05)), then `smart_resize`

Where qwen-vl-utils raises on a frame count outside [2, available] (nframes too large, a
one-frame video) we read what is there and pad to an even count by repeating the last frame,
the rule it applies to frame lists. On top, `max_tokens` caps the LLM tokens of the video
(grid_t * grid_h * grid_w / merge_size**2): see `cap_tokens`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from qwen2vl.errors import MediaError
from qwen2vl.media.image import check_frame_settings, check_int, check_number
from qwen2vl.media.patches import CLIP_MEAN, CLIP_STD
from qwen2vl.media.resize import ceil_by_factor, floor_by_factor, round_by_factor, smart_resize

logger = logging.getLogger(__name__)

FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
# qwen-vl-utils' default: 90% of a 128k-token context, in pixels.
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)
MAX_VIDEO_TOKENS = 16384


@dataclass(frozen=True, kw_only=True)
class VideoSettings:
    """How a video becomes patches; `MediaConfig.video_settings()` gives a checkpoint's.

    Frames: fps frames per second of video (for a frame list: the rate it was sampled at), or
    nframes in all (wins over fps), from [video_start, video_end] seconds, fps-sampled counts
    kept within [min_frames, max_frames]. Size per frame: within [min_pixels, max_pixels], the
    frames together within total_pixels (None: qwen-vl-utils' default), or forced by
    resized_height/resized_width. max_tokens: hard cap on the video's LLM tokens (None: no cap).
    Then the checkpoint's patch geometry and normalisation. Field names are the content-part
    keys of qwen-vl-utils.
    """

    fps: float = FPS
    nframes: int | None = None
    video_start: float | None = None
    video_end: float | None = None
    min_pixels: int = VIDEO_MIN_PIXELS
    max_pixels: int = VIDEO_MAX_PIXELS
    total_pixels: int | None = None
    max_tokens: int | None = MAX_VIDEO_TOKENS
    resized_height: int | None = None
    resized_width: int | None = None
    min_frames: int = FPS_MIN_FRAMES
    max_frames: int = FPS_MAX_FRAMES
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self) -> None:
        check_frame_settings(self)
        check_number("fps", self.fps, positive=True)
        for name in ("nframes", "total_pixels", "max_tokens"):
            check_int(name, getattr(self, name), optional=True)
        check_int("min_frames", self.min_frames, least=0)
        check_int("max_frames", self.max_frames)
        for name in ("video_start", "video_end"):
            check_number(name, getattr(self, name), optional=True)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


DEFAULT_VIDEO_SETTINGS = VideoSettings()


@dataclass(frozen=True)
class VideoPlan:
    """What a video becomes, decided from metadata alone.

    frame_indices/timestamps list every frame that goes into the patches (after padding, so a
    repeated last frame appears twice); timestamps are index / video_fps in seconds. tokens is
    the LLM token count; uncapped_tokens what the qwen-vl-utils rules alone would give, and
    capped says whether max_tokens changed the plan.
    """

    height: int
    width: int
    total_frames: int
    video_fps: float
    start_frame: int
    end_frame: int
    frame_indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    sample_fps: float
    resized_height: int
    resized_width: int
    grid_thw: tuple[int, int, int]
    tokens: int
    uncapped_tokens: int
    capped: bool


def frame_range(
    total_frames: int, video_fps: float, video_start: float | None, video_end: float | None
) -> tuple[int, int]:
    """Inclusive (start, end) frame indices of [video_start, video_end] seconds."""
    if total_frames < 1:
        raise MediaError("video has no frames")
    if video_start is None and video_end is None:
        return 0, total_frames - 1
    duration = total_frames / video_fps
    start = (
        0 if video_start is None else math.ceil(max(0.0, min(video_start, duration)) * video_fps)
    )
    end = total_frames - 1
    if video_end is not None:
        end = min(math.floor(max(0.0, min(video_end, duration)) * video_fps), total_frames - 1)
    if start >= end:
        raise MediaError(
            f"empty time range: video_start={video_start}, video_end={video_end} select frames "
            f"{start}..{end} of a {duration:.2f} s video "
            f"({total_frames} frames at {video_fps:.3f} fps)"
        )
    return start, end


def sample_count(available: int, video_fps: float, s: VideoSettings) -> int:
    """Frames to read from `available` consecutive frames (before padding to the factor)."""
    factor = s.temporal_patch_size
    if s.nframes is not None:
        n = round_by_factor(s.nframes, factor)
    else:
        lo = ceil_by_factor(s.min_frames, factor)
        hi = floor_by_factor(min(s.max_frames, available), factor)
        n = floor_by_factor(min(max(available / video_fps * s.fps, lo), hi, available), factor)
    if n > available:
        logger.warning("asked for %d frames of a %d-frame range; reading all of them", n, available)
    return max(min(n, available), min(factor, available))


def frame_indices(start: int, end: int, n: int, multiple: int) -> list[int]:
    """n indices spread evenly over [start, end], padded to a multiple by repeating the last."""
    idx = torch.linspace(start, end, n).round().long().tolist() if n > 1 else [start]
    return idx + idx[-1:] * (-len(idx) % multiple)


def frame_size(height: int, width: int, n_frames: int, s: VideoSettings) -> tuple[int, int]:
    """Resized (h, w) of every frame when n_frames frames are kept."""
    if s.resized_height is not None:
        return smart_resize(s.resized_height, s.resized_width, s.factor)
    total_pixels = VIDEO_TOTAL_PIXELS if s.total_pixels is None else s.total_pixels
    share = total_pixels / n_frames * s.temporal_patch_size
    budget = max(min(VIDEO_MAX_PIXELS, share), int(s.min_pixels * 1.05))
    if s.max_pixels > budget:
        logger.debug("per-frame max_pixels %d lowered to %d by total_pixels", s.max_pixels, budget)
    max_pixels = min(s.max_pixels, budget)
    return smart_resize(height, width, s.factor, min_pixels=s.min_pixels, max_pixels=max_pixels)


def video_tokens(n_frames: int, size: tuple[int, int], s: VideoSettings) -> int:
    return n_frames // s.temporal_patch_size * (size[0] // s.factor) * (size[1] // s.factor)


def cap_tokens(
    height: int, width: int, n_frames: int, size: tuple[int, int], s: VideoSettings
) -> tuple[int, tuple[int, int]]:
    """(n_frames, size) within s.max_tokens: first fewer pixels per frame, down to min_pixels;
    then fewer frames; then, with a single temporal patch, fewer pixels than min_pixels.

    The cap wins over everything else, a forced resized_height/resized_width included.
    """
    if s.max_tokens is None or video_tokens(n_frames, size, s) <= s.max_tokens:
        return n_frames, size
    f2, tp = s.factor**2, s.temporal_patch_size
    cap = max(s.max_tokens // (n_frames // tp) * f2, s.min_pixels)
    size = smart_resize(height, width, s.factor, min_pixels=min(s.min_pixels, cap), max_pixels=cap)
    if video_tokens(n_frames, size, s) <= s.max_tokens:
        return n_frames, size
    groups = s.max_tokens // video_tokens(tp, size, s)
    if groups >= 1:
        return groups * tp, size
    size = smart_resize(height, width, s.factor, min_pixels=f2, max_pixels=s.max_tokens * f2)
    if video_tokens(tp, size, s) <= s.max_tokens:
        return tp, size
    raise MediaError(
        f"a {width}x{height} (width x height) video needs more than max_tokens={s.max_tokens} "
        f"tokens even as {tp} frames at {size[1]}x{size[0]}; raise max_tokens"
    )


def plan_frames(
    *,
    height: int,
    width: int,
    total_frames: int,
    video_fps: float,
    settings: VideoSettings,
    presampled: bool = False,
) -> VideoPlan:
    """The whole video plan from metadata. presampled: the frames are a caller's list, already
    sampled at settings.fps (qwen-vl-utils neither subsamples nor trims a frame list)."""
    s, tp = settings, settings.temporal_patch_size
    if presampled:
        if total_frames < 1:
            raise MediaError("the frame list is empty")
        video_fps, start, end, n = s.fps, 0, total_frames - 1, total_frames
    else:
        if not video_fps > 0:
            raise MediaError(f"video reports a frame rate of {video_fps}; cannot sample by time")
        start, end = frame_range(total_frames, video_fps, s.video_start, s.video_end)
        n = sample_count(end - start + 1, video_fps, s)
    padded = ceil_by_factor(n, tp)
    rule_size = frame_size(height, width, padded, s)
    kept, size = cap_tokens(height, width, padded, rule_size, s)
    if kept < padded:
        logger.info("video capped at %d tokens: %d -> %d frames", s.max_tokens, padded, kept)
        n = kept
    indices = frame_indices(start, end, n, tp)
    grid = (len(indices) // tp, size[0] // s.patch_size, size[1] // s.patch_size)
    return VideoPlan(
        height=height,
        width=width,
        total_frames=total_frames,
        video_fps=float(video_fps),
        start_frame=start,
        end_frame=end,
        frame_indices=tuple(indices),
        timestamps=tuple(i / video_fps for i in indices),
        sample_fps=s.fps if presampled else n / (end - start + 1) * video_fps,
        resized_height=size[0],
        resized_width=size[1],
        grid_thw=grid,
        tokens=video_tokens(len(indices), size, s),
        uncapped_tokens=video_tokens(padded, rule_size, s),
        capped=(kept, size) != (padded, rule_size),
    )
