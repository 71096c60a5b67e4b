"""Media made on the fly: small videos encoded with PyAV whose frames carry their own index."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

av = pytest.importorskip("av")


def index_frame(i: int, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8 whose left half is 16*(i % 16) and right half 16*(i // 16) (i < 256)."""
    frame = np.empty((height, width, 3), dtype=np.uint8)
    frame[:, : width // 2] = 16 * (i % 16)
    frame[:, width // 2 :] = 16 * (i // 16 % 16)
    return frame


def frame_index(rgb: np.ndarray) -> int:
    """Inverse of index_frame on a decoded (slightly lossy) frame."""
    w = rgb.shape[1]
    lo = int(round(float(rgb[:, : w // 4].mean()) / 16))
    hi = int(round(float(rgb[:, -w // 4 :].mean()) / 16))
    return hi * 16 + lo


def encode_video(
    path: Path,
    *,
    codec: str = "mpeg4",
    frames: int = 32,
    width: int = 64,
    height: int = 48,
    fps: int = 8,
    gop: int | None = None,
) -> Path:
    """Encode index frames to path (container from its suffix)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb8" if codec == "gif" else "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        if codec == "mpeg4":
            stream.codec_context.qmax = 4  # near-lossless flat frames
        for i in range(frames):
            image = av.VideoFrame.from_ndarray(index_frame(i, height, width), format="rgb24")
            for packet in stream.encode(image):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture
def make_video(tmp_path):
    def make(name: str = "clip.mp4", **kwargs) -> Path:
        return encode_video(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def read_index():
    return frame_index
