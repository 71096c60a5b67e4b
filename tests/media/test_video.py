"""Videos decode the planned frames (seeking or not), in every container, with image-path pixels."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from PIL import Image

from qwen2vl.media import ImageSettings, VideoSettings, plan_video, process_image, process_video
from qwen2vl.media import decode as decode_module
from qwen2vl.media.decode import decode_frames, probe_video

av = pytest.importorskip("av")
pil_backend = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def all_frames(path) -> list[np.ndarray]:
    """Reference path: decode every frame in order."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])]


def rgb24(frame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")


@pytest.mark.parametrize(
    "name,codec",
    [
        ("a.mp4", "mpeg4"),
        ("b.mp4", "libx264"),
        ("c.webm", "libvpx"),
        ("d.mkv", "mpeg4"),
        ("e.avi", "mpeg4"),
    ],
)
def test_containers_decode_the_planned_frames(make_video, read_index, name, codec):
    path = make_video(name, codec=codec)
    meta = probe_video(path)
    assert (meta.total_frames, meta.fps, meta.height, meta.width) == (32, 8.0, 48, 64)
    video = process_video(path)
    assert video.frame_indices == (0, 4, 9, 13, 18, 22, 27, 31)  # 4 s at 2 fps
    assert video.grid_thw.tolist() == [4, 20, 28]
    assert video.pixel_values.shape == (4 * 20 * 28, 1176)
    decoded = decode_frames(path, list(video.frame_indices), meta.fps, rgb24)
    assert [read_index(decoded[i]) for i in video.frame_indices] == list(video.frame_indices)


def test_gif_video(make_video):
    video = process_video(make_video("g.gif", codec="gif"))
    assert video.grid_thw[0] >= 2 and video.pixel_values.shape[1] == 1176


@pytest.mark.parametrize("codec,gop", [("mpeg4", 4), ("libx264", 8)])
def test_seeking_gives_the_same_frames_as_decoding_everything(make_video, monkeypatch, codec, gop):
    path = make_video("long.mp4", codec=codec, frames=96, gop=gop)
    reference = all_frames(path)
    seeks = []
    real_seek = decode_module._seek
    monkeypatch.setattr(decode_module, "_seek", lambda *a: seeks.append(a[2]) or real_seek(*a))
    wanted = [0, 1, 30, 31, 50, 77, 95]
    decoded = decode_frames(path, wanted, 8.0, rgb24)
    assert seeks, "sparse frames far apart should be reached by seeking"
    for i in wanted:
        np.testing.assert_array_equal(decoded[i], reference[i])


def test_consecutive_frames_decode_without_seeking(make_video, monkeypatch):
    path = make_video("dense.mp4", frames=40, gop=4)
    monkeypatch.setattr(decode_module, "_seek", lambda *a: pytest.fail("no seek needed"))
    decoded = decode_frames(path, list(range(40)), 8.0, rgb24)
    assert len(decoded) == 40


def test_time_range_and_explicit_nframes(make_video, read_index):
    path = make_video("t.mp4", frames=64)
    video = process_video(path, VideoSettings(video_start=1.0, video_end=5.0))
    assert video.plan.start_frame == 8 and video.plan.end_frame == 40
    assert video.frame_indices[0] == 8 and video.frame_indices[-1] == 40
    assert video.timestamps[0] == 1.0 and video.timestamps[-1] == 5.0
    video = process_video(path, VideoSettings(nframes=6))
    assert video.frame_indices == (0, 13, 25, 38, 50, 63)
    meta = probe_video(path)
    decoded = decode_frames(path, list(video.frame_indices), meta.fps, rgb24)
    assert [read_index(decoded[i]) for i in video.frame_indices] == list(video.frame_indices)


def test_pixels_match_the_image_processor_frame_by_frame(make_video):
    """transformers' video processor needs torchvision, so each frame goes through its PIL image
    processor (same resize, rescale, normalise) and frame pairs are interleaved on the time axis."""
    path = make_video("p.mp4", frames=16)
    video = process_video(path, VideoSettings(nframes=4))
    frames = all_frames(path)
    processor = pil_backend.Qwen2VLImageProcessorPil(
        min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28
    )
    per_frame = []
    for i in video.frame_indices:
        out = processor(images=Image.fromarray(frames[i]), return_tensors="pt")
        assert out["image_grid_thw"][0, 1:].tolist() == video.grid_thw[1:].tolist()
        per_frame.append(out["pixel_values"].view(-1, 3, 2, 14, 14)[:, :, 0])  # [N, C, P, P]
    pairs = [torch.stack(per_frame[k : k + 2], dim=2) for k in range(0, len(per_frame), 2)]
    expected = torch.cat(pairs).reshape(-1, 1176)
    assert (video.pixel_values - expected).abs().max().item() <= 1e-5


def test_plan_video_is_what_processing_does(make_video):
    path = make_video("plan.mp4", frames=64)
    for kwargs in [{}, {"fps": 1.0}, {"nframes": 10}, {"max_tokens": 300}, {"video_end": 3.0}]:
        settings = VideoSettings(**kwargs)
        plan = plan_video(path, settings)
        video = process_video(path, settings)
        assert plan == video.plan
        assert video.pixel_values.shape[0] == plan.tokens * 4
        assert tuple(video.grid_thw.tolist()) == plan.grid_thw


def test_token_cap_holds_on_a_real_video(make_video):
    video = process_video(make_video("cap.mp4", frames=64), VideoSettings(fps=8.0, max_tokens=500))
    assert video.plan.capped and video.plan.tokens <= 500
    assert video.pixel_values.shape[0] == video.plan.tokens * 4


def test_video_from_bytes_and_data_uri(make_video):
    data = make_video("bytes.mp4").read_bytes()
    uri = "data:video/mp4;base64," + base64.b64encode(data).decode()
    expected = process_video(data).pixel_values
    assert torch.equal(process_video(uri).pixel_values, expected)


def test_video_input_unpacks_and_reports_timestamps(make_video):
    video = process_video(make_video("u.mp4"))
    pixel_values, grid_thw = video
    assert pixel_values is video.pixel_values and grid_thw is video.grid_thw
    assert video.timestamps == tuple(i / 8.0 for i in video.frame_indices)
    assert video.plan.sample_fps == 2.0


def test_frame_list_is_already_sampled_and_padded(tmp_path):
    colours = [(i * 40, 0, 0) for i in range(5)]
    images = [Image.new("RGB", (64, 48), c) for c in colours]
    images[1].save(tmp_path / "f1.png")
    frames = [images[0], tmp_path / "f1.png", np.asarray(images[2]), images[3], images[4]]
    video = process_video(frames, VideoSettings(fps=4.0))
    assert video.frame_indices == (0, 1, 2, 3, 4, 4)
    assert video.timestamps == (0.0, 0.25, 0.5, 0.75, 1.0, 1.0)
    assert video.grid_thw.tolist() == [3, 20, 28]
    # Each frame pair equals the image path's patches of those frames.
    first, _ = process_image(
        images[0], ImageSettings(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)
    )
    rows = video.pixel_values.view(3, -1, 3, 2, 14, 14)
    torch.testing.assert_close(rows[0, :, :, 0], first.view(-1, 3, 2, 14, 14)[:, :, 0])
    # The padded last pair holds the same frame twice.
    torch.testing.assert_close(rows[2, :, :, 0], rows[2, :, :, 1])


def test_frame_list_with_mixed_sizes_uses_the_first_frames_plan():
    frames = [Image.new("RGB", (64, 48)), Image.new("RGB", (100, 30))]
    video = process_video(frames)
    assert video.grid_thw.tolist() == [1, 20, 28]
