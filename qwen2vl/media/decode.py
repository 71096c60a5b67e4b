"""Video containers via PyAV: metadata without decoding, and only the wanted frames decoded.

PyAV (`av`) is imported inside the functions: it is an optional dependency (`qwen2vl[video]`).

Frame i is the frame shown at i / fps (its pts, relative to the stream start, times fps,
rounded), which is the i-th decoded frame for constant-rate video. To skip work on long videos
the decoder reads the keyframe positions from the packets first (demuxing, no decoding), then
seeks straight to the keyframe before a wanted frame whenever that keyframe lies well beyond
the current decode position, so it never decodes more than a sequential pass would. Only the
wanted frames are kept, each converted (resized) as soon as it is decoded and released once
converted; how many full-size frames wait for conversion follows a byte budget, so a tiny file
that declares huge frames (a GIF's logical screen) cannot hold gigabytes.
"""

from __future__ import annotations

import bisect
import io
import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwen2vl.errors import MediaError

logger = logging.getLogger(__name__)

# Seek when the keyframe before a wanted frame lies more than this many frames past the decode
# position. Measured on 720p mpeg4 (GOP 12, 2 cores): a seek costs less than decoding a frame.
SEEK_MIN_SKIP = 1
# Full-size frames alive at once (decoded, waiting, being converted, or held by the decoder's
# threads) fit in this: 4K video keeps 4 in flight; frames over 4096 x 4096 go one at a time.
FRAME_MEMORY_BUDGET = 512 * 1024 * 1024
# What one full-size frame costs, measured on a GIF rendered at 6000 x 6000: the decoded frame
# (4 bytes a pixel as BGRA) and, while converted, its rgb24 copy, PyAV's bytes copy of that and
# the PIL RGB image (4 bytes a pixel).
FRAME_BYTES_PER_PIXEL = 16


@dataclass(frozen=True)
class VideoMeta:
    """A video stream as its container describes it."""

    total_frames: int
    fps: float
    height: int
    width: int


def probe_video(data: Path | bytes) -> VideoMeta:
    """Frame count, frame rate and frame size of the first video stream; no frame is decoded.

    Containers without a frame count in their header (webm, mkv) have their packets counted.
    """
    with _open(data) as container:
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        total = stream.frames or sum(1 for packet in _demux(container, stream) if packet.size)
    if total < 1:
        raise MediaError("video has no frames")
    if width < 1 or height < 1:
        raise MediaError(f"video stream reports a frame size of {width}x{height}")
    if not rate or float(rate) <= 0:
        raise MediaError("video stream reports no frame rate")
    return VideoMeta(total_frames=int(total), fps=float(rate), height=height, width=width)


def decode_frames(
    data: Path | bytes,
    indices: list[int],
    fps: float,
    convert: Callable[[Any], np.ndarray],
) -> dict[int, np.ndarray]:
    """{index: convert(frame)} for every wanted frame index.

    A wanted index past the last decodable frame (headers can overstate the count) gets the
    last frame. convert takes an `av.VideoFrame`.
    """
    wanted = sorted(set(indices))
    with _open(data) as container:
        stream = container.streams.video[0]
        keyframes = _keyframe_indices(container, stream, fps)
    # Conversion (colour conversion and resize, both GIL-free in C) overlaps decoding.
    workers = max(1, min(4, os.cpu_count() or 1))
    futures: dict[int, Future] = {}
    in_flight: deque[Future] = deque()
    with _open(data) as container, ThreadPoolExecutor(workers) as pool:
        stream = container.streams.video[0]
        frames_allowed = _frames_within_budget(stream.codec_context)
        _set_decoder_threads(stream, frames_allowed)
        # Counting the frame the decoder makes next, at most this many are alive at once.
        max_in_flight = min(2 * workers, frames_allowed)
        future = None
        for target, frame in _wanted_frames(container, stream, wanted, keyframes, fps):
            if frame is not None:
                future = pool.submit(convert, frame)
                del frame  # the pool's reference is dropped once converted; keep none here
                in_flight.append(future)
                while len(in_flight) >= max_in_flight:
                    in_flight.popleft().result()
            futures[target] = future
    return {target: future.result() for target, future in futures.items()}


def _frames_within_budget(codec_context) -> int:
    """How many full-size frames FRAME_MEMORY_BUDGET holds (at least 1), from the header size."""
    frame_bytes = max(1, codec_context.width * codec_context.height) * FRAME_BYTES_PER_PIXEL
    return max(1, FRAME_MEMORY_BUDGET // frame_bytes)


def _set_decoder_threads(stream, frames_allowed: int) -> None:
    # Frame threading keeps a frame per decoder thread; the automatic count (one per core, up
    # to 16) is kept unless huge frames would make those frames alone exceed the budget.
    stream.thread_type = "AUTO"
    if frames_allowed < (os.cpu_count() or 1) + 1:
        stream.codec_context.thread_count = frames_allowed


def _wanted_frames(container, stream, wanted, keyframes, fps) -> Iterator[tuple[int, Any]]:
    """(target, frame) for each wanted index: the first frame at or after it, else the last.

    frame is None when it is the one yielded before: no full-size frame stays referenced here
    after it was handed out, so the caller alone decides how long it lives.
    """
    frames: Iterator | None = None
    last_idx, seen = -1, False
    for target in wanted:
        fresh = None
        if last_idx < target:
            pos = bisect.bisect_right(keyframes, target) - 1
            key = keyframes[pos] if pos >= 0 else 0
            if frames is None or key > last_idx + SEEK_MIN_SKIP:
                frames = (
                    _seek(container, stream, key, fps) if key > 0 else _decode(container, stream)
                )
            for fresh in frames:
                last_idx, seen = _frame_index(fresh, stream, fps, last_idx), True
                if last_idx >= target:
                    break
        if not seen:
            raise MediaError("video stream holds no decodable frames")
        yield target, fresh
        fresh = None


def _frame_index(frame, stream, fps: float, previous: int) -> int:
    if frame.pts is None:
        return previous + 1  # some AVI files carry no timestamps: count frames instead
    start = stream.start_time or 0
    return round(float((frame.pts - start) * stream.time_base) * fps)


def _keyframe_indices(container, stream, fps: float) -> list[int]:
    start = stream.start_time or 0
    keys = {
        round(float((p.pts - start) * stream.time_base) * fps)
        for p in _demux(container, stream)
        if p.is_keyframe and p.pts is not None
    }
    return sorted(keys)


def _seek(container, stream, key: int, fps: float) -> Iterator:
    import av

    start = stream.start_time or 0
    offset = start + int(round(key / fps / float(stream.time_base)))
    try:
        container.seek(offset, stream=stream, backward=True, any_frame=False)
    except av.FFmpegError as e:
        # Some streams cannot seek; decoding on from where we are stays correct, only slower.
        logger.debug("seek to frame %d failed (%s); decoding sequentially", key, e)
    return _decode(container, stream)


def _decode(container, stream) -> Iterator:
    import av

    try:
        yield from container.decode(stream)
    except av.FFmpegError as e:
        raise MediaError(f"cannot decode video: {e}") from e


def _demux(container, stream) -> Iterator:
    import av

    try:
        yield from container.demux(stream)
    except av.FFmpegError as e:
        raise MediaError(f"cannot read video packets: {e}") from e


@contextmanager
def _open(data: Path | bytes) -> Iterator[Any]:
    try:
        import av
    except ImportError as e:
        raise MediaError('video files need PyAV: pip install "qwen2vl[video]"') from e
    try:
        container = av.open(str(data) if isinstance(data, Path) else io.BytesIO(data), mode="r")
    except (av.FFmpegError, OSError, ValueError, UnicodeDecodeError) as e:
        raise MediaError(f"cannot open video: {e}") from e
    try:
        if not container.streams.video:
            raise MediaError("file holds no video stream")
        yield container
    finally:
        container.close()
