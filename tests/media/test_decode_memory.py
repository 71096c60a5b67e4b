"""Tiny uploads never cost gigabytes, and short pixel data is refused, not padded.

Peak memory is measured in a fresh interpreter (ru_maxrss before and after the decode), with
glibc serving large blocks from mmap so that freed memory leaves the count: the peak is then
what was alive at once, not what the allocator kept for later.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from qwen2vl.errors import MediaError
from qwen2vl.media import load_image

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss in KiB is Linux's")

MEASURE_IMAGE = """
import resource, sys
from qwen2vl.media import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(sys.argv[1])
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""

MEASURE_VIDEO = """
import resource, sys
from pathlib import Path
import numpy as np
from qwen2vl.media import decode
decode.FRAME_MEMORY_BUDGET = int(sys.argv[2])
path = Path(sys.argv[1])
meta = decode.probe_video(path)
wanted = list(range(0, meta.total_frames, 2))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
frames = decode.decode_frames(
    path, wanted, meta.fps, lambda frame: np.asarray(frame.to_image().resize((28, 28)))
)
assert sorted(frames) == wanted
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def peak_growth(script: str, *args: str) -> int:
    """Bytes the peak RSS of a fresh interpreter grows by while the script's decode runs."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    done = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def png_file(width: int, height: int, idat: list[bytes], *, depth=8, color=2, interlace=0):
    """A PNG with the given IHDR fields and IDAT chunk payloads, IEND last."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace)
    chunks = [chunk(b"IHDR", ihdr), *(chunk(b"IDAT", data) for data in idat)]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks) + chunk(b"IEND", b"")


def scanlines(pixels: np.ndarray) -> bytes:
    """Unfiltered PNG rows of an [H, W, C] uint8 array: a 0 filter byte, then the row."""
    return b"".join(b"\x00" + row.tobytes() for row in pixels)


def adam7_scanlines(pixels: np.ndarray) -> bytes:
    """Rows of the seven interlace passes; a pass with no pixels has no rows at all."""
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2))
    subimages = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in (*passes, (0, 1, 1, 2))]
    return b"".join(scanlines(sub) for sub in subimages if sub.size)


def encoded(image: Image.Image, kind: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


def noise(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)


# ---- 16-bit images -------------------------------------------------------------------------


def test_16bit_png_decodes_to_its_values_over_257_rounded():
    # 600k pixels: more than one conversion stripe, so stripe edges are covered
    values = np.random.default_rng(0).integers(0, 65536, (500, 1200), np.uint16)
    rgb = np.asarray(load_image(encoded(Image.fromarray(values), "PNG")))
    expected = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


@linux_only
def test_16bit_png_decode_peaks_at_its_source_plus_the_rgb_result(tmp_path):
    side = 4096
    row = b"\x00" + (np.arange(side) * 16).astype(">u2").tobytes()
    deflate = zlib.compressobj(1)
    data = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    path = tmp_path / "gray16.png"
    path.write_bytes(png_file(side, side, [data], depth=16, color=0))
    # Pillow holds the decoded source (2 bytes a pixel) and the RGB result (stored as RGBX: 4);
    # a whole-image float64 temporary alone would be 8
    assert peak_growth(MEASURE_IMAGE, str(path)) < 8 * side * side


# ---- truncated images ----------------------------------------------------------------------


def short_stream_png() -> bytes:
    """A PNG promising 300 rows whose zlib stream ends, cleanly, after 3."""
    return png_file(100, 300, [zlib.compress(scanlines(noise(300, 100)[:3]))])


def cut_after_first_idat(keep_iend: bool) -> bytes:
    stream = zlib.compress(scanlines(noise(300, 100)))
    whole = png_file(100, 300, [stream[:1000], stream[1000:]])
    cut = whole.index(b"IDAT", whole.index(b"IDAT") + 1) - 4  # the second IDAT's length
    return whole[:cut] + (chunk(b"IEND", b"") if keep_iend else b"")


@pytest.mark.parametrize(
    "data",
    [short_stream_png(), cut_after_first_idat(True), cut_after_first_idat(False)],
    ids=["stream-ends-early", "cut-after-first-idat-with-iend", "cut-after-first-idat"],
)
def test_png_whose_pixel_data_ends_early_is_refused_as_truncated(data):
    with pytest.raises(MediaError, match="truncated"):
        load_image(data)


@pytest.mark.parametrize("kind", ["JPEG", "GIF"])
def test_cut_jpeg_and_gif_are_refused_as_truncated(kind):
    whole = encoded(Image.fromarray(noise(300, 100)), kind)
    with pytest.raises(MediaError, match="truncated"):
        load_image(whole[: len(whole) // 2])


@pytest.mark.parametrize("height, width", [(1, 1), (5, 3), (9, 17), (300, 100)])
def test_complete_pngs_interlaced_or_split_over_idat_chunks_decode(height, width):
    pixels = noise(height, width)
    stream = zlib.compress(scanlines(pixels))
    split = png_file(width, height, [stream[:10], stream[10:20], stream[20:]])
    np.testing.assert_array_equal(np.asarray(load_image(split)), pixels)
    interlaced = png_file(width, height, [zlib.compress(adam7_scanlines(pixels))], interlace=1)
    np.testing.assert_array_equal(np.asarray(load_image(interlaced)), pixels)


# ---- videos --------------------------------------------------------------------------------


def gif_with_screen(side: int, frames: int) -> bytes:
    """A GIF of 1x1-pixel frames on a side x side logical screen, which decoders render whole."""
    screen = struct.pack("<HHBBB", side, side, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = (
        b"\x21\xf9\x04\x00\x0a\x00\x00\x00"  # graphic control: shown for 0.1 s
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 1, 1, 0)
        + b"\x02\x02\x44\x01\x00"  # LZW, minimum code size 2: clear, colour 0, end
    )
    return b"GIF89a" + screen + frame * frames + b";"


@linux_only
def test_video_frames_alive_at_once_follow_the_memory_budget(tmp_path):
    pytest.importorskip("av")
    side, budget = 2000, 64 << 20  # a 2000 x 2000 frame costs ~64 MB: one at a time
    path = tmp_path / "screen.gif"
    path.write_bytes(gif_with_screen(side, frames=16))
    # Over the budget: the GIF decoder's own canvas and the frame it renders (4 bytes a pixel
    # each). Without the budget 4+ frames are in flight, each converted through RGB copies.
    assert peak_growth(MEASURE_VIDEO, str(path), str(budget)) < budget + 8 * side * side
