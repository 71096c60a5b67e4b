"""Bad input is a MediaError with a clear message: no hang, no unbounded memory."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from qwen2vl.errors import MediaError
from qwen2vl.media import (
    MediaAccess,
    VideoSettings,
    load_image,
    plan_image,
    plan_video,
    process_image,
    process_video,
)
from qwen2vl.media import video as video_module
from qwen2vl.media.decode import VideoMeta

av = pytest.importorskip("av")


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with no pixel data at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


# ---- images --------------------------------------------------------------------------------


def test_zero_byte_corrupt_and_truncated_images(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="cannot open image"):
        load_image(empty)
    with pytest.raises(MediaError, match="cannot open image"):
        load_image(b"definitely not an image")
    whole = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)))
    with pytest.raises(MediaError, match="cannot decode image"):
        process_image(whole[: len(whole) // 2])
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(jpeg, format="JPEG")
    with pytest.raises(MediaError):
        load_image(jpeg.getvalue()[:200])


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(MediaError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(MediaError, match="not a regular file"):
        load_image(tmp_path)


def test_one_pixel_image_is_fine():
    pixel_values, grid_thw = process_image(Image.new("RGB", (1, 1), (9, 9, 9)))
    assert grid_thw.tolist() == [1, 4, 4]  # min_pixels 56*56 -> 56x56
    assert pixel_values.shape == (16, 1176)


def test_extreme_aspect_ratio_is_refused_before_decoding():
    data = png_header_only(100000, 1)  # no pixel data: decoding would fail, the header suffices
    with pytest.raises(MediaError, match="aspect ratio"):
        process_image(data)
    with pytest.raises(MediaError, match="aspect ratio"):
        plan_image(data)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bombs_are_refused_from_the_header():
    with pytest.raises(MediaError, match="decompression bomb"):
        load_image(png_header_only(12000, 12000))  # over our bound, under Pillow's own
    with pytest.raises(MediaError, match="decompression bomb"):
        load_image(png_header_only(100000, 100000))  # Pillow's own guard, same error type
    with pytest.raises(MediaError, match="decompression bomb guard"):
        load_image(Image.new("RGB", (100, 100)), MediaAccess(max_image_pixels=5000))


def test_png_text_chunk_bomb():
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)
    with pytest.raises(MediaError, match="too large"):
        load_image(png(Image.new("RGB", (4, 4)), pnginfo=info))


@pytest.mark.parametrize(
    "array",
    [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((2, 4, 4, 3), np.uint8)],
    ids=["float", "two_channels", "4d"],
)
def test_bad_arrays(array):
    with pytest.raises(MediaError, match="image arrays"):
        load_image(array)


# ---- videos --------------------------------------------------------------------------------


def audio_frame():
    frame = av.AudioFrame.from_ndarray(np.zeros((1, 1152), np.int16), format="s16", layout="mono")
    frame.sample_rate = 8000
    return frame


def write_with_audio(path, with_video_stream: bool):
    with av.open(str(path), "w") as container:
        if with_video_stream:
            stream = container.add_stream("mpeg4", rate=8)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000, layout="mono")
        for packet in [*audio.encode(audio_frame()), *audio.encode()]:
            container.mux(packet)
    return path


def test_no_video_stream_and_zero_frames(tmp_path):
    with pytest.raises(MediaError, match="no video stream"):
        process_video(write_with_audio(tmp_path / "audio.wav", with_video_stream=False))
    with pytest.raises(MediaError, match="no frames"):
        plan_video(write_with_audio(tmp_path / "empty.mkv", with_video_stream=True))


def test_zero_byte_corrupt_and_truncated_videos(tmp_path, make_video):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    whole = make_video("whole.mp4").read_bytes()  # mp4 keeps its index at the end
    for bad in [tmp_path / "zero.mp4", tmp_path / "junk.mp4", whole[: len(whole) // 2]]:
        with pytest.raises(MediaError, match="cannot open video"):
            process_video(bad)
    with pytest.raises(MediaError, match="does not exist"):
        process_video(tmp_path / "missing.mp4")


def test_truncated_stream_decodes_what_is_there(make_video):
    data = make_video("cut.mkv").read_bytes()
    video = process_video(data[: len(data) // 2])
    assert video.plan.total_frames < 32
    assert video.pixel_values.shape[0] == video.plan.grid_thw[0] * 20 * 28


def test_absurd_frame_count_is_capped_and_decoded_lazily(make_video, monkeypatch):
    """A header claiming 100k frames: the plan caps frames and tokens; decoding keeps only
    the planned frames (here past the real end, so all are the last real frame)."""
    path = make_video("short.mp4")
    monkeypatch.setattr(video_module, "probe_video", lambda data: VideoMeta(100_000, 30.0, 48, 64))
    conversions = []
    resizer = video_module._resizer

    def counting(size):
        convert = resizer(size)
        return lambda frame: conversions.append(1) or convert(frame)

    monkeypatch.setattr(video_module, "_resizer", counting)
    video = process_video(path, VideoSettings(max_tokens=2048))
    assert len(video.frame_indices) <= 768
    assert video.plan.tokens <= 2048 and video.plan.capped
    assert video.plan.uncapped_tokens > 16384
    assert len(conversions) <= 32  # one conversion per distinct decoded frame


def test_video_sources_are_checked_like_images(tmp_path, make_video):
    path = make_video("clip.mp4")
    with pytest.raises(MediaError, match="allow_remote=True"):
        plan_video("https://example.com/v.mp4")
    with pytest.raises(MediaError, match="outside the allowed media directory"):
        plan_video(path, access=MediaAccess(local_dir=tmp_path / "elsewhere"))
    with pytest.raises(MediaError, match="frame list is empty"):
        process_video([])
