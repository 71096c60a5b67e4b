"""Every kind of source loads, and colour modes come out as sensible RGB."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qwen2vl.errors import MediaError
from qwen2vl.media import ImageSettings, MediaAccess, load_image, plan_image, process_image
from qwen2vl.media.source import fetch_remote


def png_bytes(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


@pytest.fixture
def gradient() -> Image.Image:
    y, x = np.mgrid[0:40, 0:60]
    return Image.fromarray(np.stack([x * 4, y * 6, x + y], -1).astype(np.uint8))


@pytest.fixture
def serve(tmp_path):
    """An HTTP server on localhost serving tmp_path; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_every_local_source_kind_gives_the_same_pixels(tmp_path, gradient):
    path = tmp_path / "g.png"
    gradient.save(path)
    data = path.read_bytes()
    encoded = base64.b64encode(data).decode()
    sources = [
        str(path),
        path,
        f"file://{path}",
        f"data:image/png;base64,{encoded}",
        f"data:image;base64,{encoded}",  # qwen-vl-utils' form
        data,
        bytearray(data),
        gradient,
        np.asarray(gradient),
    ]
    expected = np.asarray(gradient)
    for source in sources:
        image = load_image(source)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_remote_needs_allow_remote(serve, tmp_path, gradient):
    (tmp_path / "g.png").write_bytes(png_bytes(gradient))
    with pytest.raises(MediaError, match="allow_remote=True"):
        load_image(f"{serve}/g.png")
    image = load_image(f"{serve}/g.png", MediaAccess(allow_remote=True))
    np.testing.assert_array_equal(np.asarray(image), np.asarray(gradient))


def test_remote_size_cap_and_missing_url(serve, tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    with pytest.raises(MediaError, match="over the cap"):
        fetch_remote(f"{serve}/big.bin", max_bytes=1000)
    with pytest.raises(MediaError, match="cannot fetch"):
        load_image(f"{serve}/missing.png", MediaAccess(allow_remote=True))


def test_allowed_local_dir_confines_paths_after_resolving_symlinks(tmp_path, gradient):
    inside, outside = tmp_path / "inside", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    gradient.save(inside / "ok.png")
    gradient.save(outside / "secret.png")
    (inside / "link.png").symlink_to(outside / "secret.png")
    assert load_image(inside / "ok.png", MediaAccess(local_dir=inside)).size == (60, 40)
    for bad in [outside / "secret.png", inside / "link.png", f"{inside}/../outside/secret.png"]:
        with pytest.raises(MediaError, match="outside the allowed media directory"):
            load_image(bad, MediaAccess(local_dir=inside))
    with pytest.raises(MediaError, match="outside the allowed media directory"):
        load_image(f"file://{outside / 'secret.png'}", MediaAccess(local_dir=inside))


def test_unsupported_scheme_and_bad_data_uri():
    with pytest.raises(MediaError, match="unsupported URL scheme"):
        load_image("ftp://example.com/a.png")
    with pytest.raises(MediaError, match="invalid base64"):
        load_image("data:image/png;base64,@@@@")
    with pytest.raises(MediaError):
        load_image(12345)


def test_transparency_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent except one opaque pixel
    rgba[0, 0, 3] = 255
    rgb = np.asarray(load_image(Image.fromarray(rgba)))
    assert rgb[0, 0].tolist() == [255, 0, 0]
    assert rgb[1, 1].tolist() == [255, 255, 255]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(load_image(palette)).tolist() == [[[255, 255, 255], [10, 20, 30]]]


def test_high_depth_and_other_modes_become_8bit_rgb():
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    i16 = Image.fromarray(levels * 257)
    assert i16.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(load_image(i16))[..., 0], levels)
    i32 = Image.fromarray(levels.astype(np.int32) * 257)
    np.testing.assert_array_equal(np.asarray(load_image(i32))[..., 1], levels)
    floats = Image.fromarray(levels.astype(np.float32) / 255)
    np.testing.assert_array_equal(np.asarray(load_image(floats))[..., 2], levels)
    cmyk = Image.new("CMYK", (3, 3), (0, 255, 255, 0))
    assert np.asarray(load_image(cmyk))[0, 0].tolist() == [255, 0, 0]
    assert np.asarray(load_image(np.full((5, 5, 1), 7, np.uint8)))[0, 0].tolist() == [7, 7, 7]


def test_exif_orientation_is_applied_and_planned(tmp_path):
    image = Image.fromarray(np.zeros((20, 60, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    with Image.open(path) as stored:
        assert stored.size == (60, 20)
    assert load_image(path).size == (20, 60)
    plan = plan_image(path, ImageSettings(min_pixels=1, max_pixels=10**6))
    assert (plan.height, plan.width) == (60, 20)
    _, grid_thw = process_image(path, ImageSettings(min_pixels=1, max_pixels=10**6))
    assert tuple(grid_thw.tolist()) == plan.grid_thw


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert np.asarray(load_image(path))[0, 0].tolist() == [255, 0, 0]


def test_plan_image_matches_processing(tmp_path, gradient):
    path = tmp_path / "g.png"
    gradient.save(path)
    for source in [path, gradient, np.asarray(gradient), (40, 60)]:
        plan = plan_image(source)
        assert (plan.resized_height, plan.resized_width) == (56, 84)
        assert plan.grid_thw == (1, 4, 6) and plan.tokens == 6 and plan.num_patches == 24
    pixel_values, grid_thw = process_image(path)
    assert tuple(grid_thw.tolist()) == plan_image(path).grid_thw
    assert pixel_values.shape[0] == plan_image(path).num_patches


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads everything")
def test_unreadable_file_is_a_media_error(tmp_path, gradient):
    path = Path(tmp_path / "locked.png")
    gradient.save(path)
    path.chmod(0)
    with pytest.raises(MediaError):
        load_image(path)
