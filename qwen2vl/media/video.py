"""Videos to vision patches: plan from metadata, decode only the planned frames, patchify.

A video is a container (path, file:// or data: URI, bytes, or http(s) where MediaAccess
allows) decoded with PyAV, or a list of frames (anything `load_image` takes) that counts as
already sampled at `VideoSettings.fps` frames per second, as qwen-vl-utils treats frame lists.
Frame choice and size follow qwen-vl-utils (see `sampling.py`), with a hard cap of
`VideoSettings.max_tokens` LLM tokens per video. Each frame is resized like an image (bicubic
PIL; qwen-vl-utils resizes video with torchvision's antialiased bicubic, so pixels can differ
slightly from it, not sizes or indices).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from qwen2vl.errors import MediaError
from qwen2vl.media.decode import decode_frames, probe_video
from qwen2vl.media.patches import normalize_table, patchify
from qwen2vl.media.resize import resize_rgb
from qwen2vl.media.sampling import DEFAULT_VIDEO_SETTINGS, VideoPlan, VideoSettings, plan_frames
from qwen2vl.media.source import (
    DEFAULT_ACCESS,
    MAX_REMOTE_VIDEO_BYTES,
    ImageSource,
    MediaAccess,
    load_image,
    open_image,
    oriented_size,
    read_source,
)

VideoSource = str | os.PathLike | bytes | Sequence[ImageSource]


@dataclass(frozen=True, eq=False)
class VideoInput:
    """A processed video. Unpacks as `pixel_values, grid_thw = process_video(...)`.

    pixel_values [grid_t*grid_h*grid_w, 3*Tp*P*P] float32; grid_thw LongTensor [3] in patches;
    timestamps (seconds) and frame_indices of every frame in the patches, padding included;
    plan holds the sizes, token count and whether the token cap applied.
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    timestamps: tuple[float, ...]
    frame_indices: tuple[int, ...]
    plan: VideoPlan

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.pixel_values, self.grid_thw))


def plan_video(
    video: VideoSource,
    settings: VideoSettings = DEFAULT_VIDEO_SETTINGS,
    *,
    access: MediaAccess = DEFAULT_ACCESS,
) -> VideoPlan:
    """Frame indices, timestamps, resized size, grid and token count, from metadata only: the
    plan `process_video` follows with the same arguments."""
    plan, _ = _plan(video, settings, access)
    return plan


def process_video(
    video: VideoSource,
    settings: VideoSettings = DEFAULT_VIDEO_SETTINGS,
    *,
    access: MediaAccess = DEFAULT_ACCESS,
) -> VideoInput:
    """A video (container or frame list) -> VideoInput with patches, grid, timestamps and plan."""
    plan, data = _plan(video, settings, access)
    size = (plan.resized_height, plan.resized_width)
    if isinstance(data, list):
        frames = _load_listed(data, plan.frame_indices, size, access)
    else:
        decoded = decode_frames(data, list(plan.frame_indices), plan.video_fps, _resizer(size))
        frames = [decoded[i] for i in plan.frame_indices]
    pixel_values = patchify(
        np.stack(frames),
        normalize_table(tuple(settings.image_mean), tuple(settings.image_std)),
        patch_size=settings.patch_size,
        merge_size=settings.merge_size,
        temporal_patch_size=settings.temporal_patch_size,
    )
    return VideoInput(
        pixel_values=pixel_values,
        grid_thw=torch.tensor(plan.grid_thw, dtype=torch.long),
        timestamps=plan.timestamps,
        frame_indices=plan.frame_indices,
        plan=plan,
    )


def _plan(
    video: VideoSource, settings: VideoSettings, access: MediaAccess
) -> tuple[VideoPlan, Any]:
    """(plan, data): data is the frame list, or the container's checked path or bytes."""
    if isinstance(video, (list, tuple)):
        if not video:
            raise MediaError("the frame list is empty")
        first = open_image(video[0], access, max_pixels=access.max_frame_pixels)
        try:
            height, width = oriented_size(first)
        finally:
            if first is not video[0]:
                first.close()
        plan = plan_frames(
            height=height,
            width=width,
            total_frames=len(video),
            video_fps=settings.fps,
            settings=settings,
            presampled=True,
        )
        return plan, list(video)
    data = read_source(video, access, max_remote_bytes=MAX_REMOTE_VIDEO_BYTES)
    meta = probe_video(data)
    if meta.width * meta.height > access.max_frame_pixels:
        raise MediaError(
            f"video frames of {meta.width}x{meta.height} (width x height) are over the limit of "
            f"{access.max_frame_pixels} pixels; downscale the video first or raise the limit",
            code="image_too_large",
        )
    plan = plan_frames(
        height=meta.height,
        width=meta.width,
        total_frames=meta.total_frames,
        video_fps=meta.fps,
        settings=settings,
    )
    return plan, data


def _resizer(size: tuple[int, int]):
    def convert(frame: Any) -> np.ndarray:  # av.VideoFrame -> [H, W, 3] uint8 at the plan size
        # to_ndarray, not to_image: the same pixels without PyAV's extra copy of the frame
        return np.asarray(resize_rgb(Image.fromarray(frame.to_ndarray(format="rgb24")), *size))

    return convert


def _load_listed(
    frames: list[ImageSource], indices: tuple[int, ...], size: tuple[int, int], access: MediaAccess
) -> list[np.ndarray]:
    """The listed frames at `indices`, each loaded, resized to the plan size, loaded once."""
    loaded: dict[int, np.ndarray] = {}
    for i in dict.fromkeys(indices):
        image = load_image(frames[i], access, max_pixels=access.max_frame_pixels)
        loaded[i] = np.asarray(resize_rgb(image, *size))
    return [loaded[i] for i in indices]
