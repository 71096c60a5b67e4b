"""MediaConfig reads both preprocessor_config.json styles; content parts override it per item."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from qwen2vl.errors import ConfigError, MediaError
from qwen2vl.media import (
    CLIP_MEAN,
    CLIP_STD,
    ImageSettings,
    MediaConfig,
    VideoSettings,
    load_media_config,
    plan_part,
    process_image,
    process_part,
)

OFFICIAL = {  # Qwen/Qwen2-VL-2B-Instruct preprocessor_config.json (transformers 4 style)
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}


def test_both_config_styles_read_the_same():
    v5 = {k: v for k, v in OFFICIAL.items() if k not in ("min_pixels", "max_pixels")}
    v5["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    legacy = dict(v5, size={"min_pixels": 3136, "max_pixels": 12845056})
    expected = MediaConfig(min_pixels=3136, max_pixels=12845056)
    assert MediaConfig.from_hf(OFFICIAL) == MediaConfig.from_hf(v5) == expected
    assert MediaConfig.from_hf(legacy) == expected
    assert expected.image_mean == CLIP_MEAN
    # top-level keys win over size, as in transformers
    both = dict(v5, min_pixels=1000)
    assert MediaConfig.from_hf(both).min_pixels == 1000


def test_load_media_config_reads_the_checkpoint_dir(tmp_path):
    assert load_media_config(tmp_path) == MediaConfig()
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(OFFICIAL))
    video = {"size": {"shortest_edge": 50000, "longest_edge": 90000}}
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(video))
    config = load_media_config(tmp_path)
    assert (config.max_pixels, config.video_min_pixels, config.video_max_pixels) == (
        12845056,
        50000,
        90000,
    )
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError):
        load_media_config(tmp_path)


def test_inconsistent_config_is_a_config_error():
    with pytest.raises(ConfigError):
        MediaConfig(min_pixels=5000, max_pixels=100)
    with pytest.raises(ConfigError):
        MediaConfig(image_std=(1.0, 0.0, 1.0))


def test_image_part_overrides_config_and_matches_process_image():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8))
    config = MediaConfig(max_pixels=28 * 28 * 64)
    part = {"type": "image", "image": image, "max_pixels": 28 * 28 * 16}
    pixel_values, grid_thw = process_part(part, config)
    expected, expected_grid = process_image(image, ImageSettings(max_pixels=28 * 28 * 16))
    assert grid_thw.tolist() == expected_grid.tolist() and (pixel_values == expected).all()
    plan = plan_part(part, config)
    assert plan.grid_thw == tuple(grid_thw.tolist())
    assert plan_part({"type": "image", "image": image}, config).tokens <= 64
    openai_style = {"type": "image_url", "image_url": {"url": image}}
    assert plan_part(openai_style, config).grid_thw == plan_part({"image": image}, config).grid_thw
    forced = plan_part({"image": image, "resized_height": 112, "resized_width": 224})
    assert forced.grid_thw == (1, 8, 16)


def test_video_part_keys(make_video):
    path = make_video("v.mp4", frames=64)
    part = {"type": "video", "video": str(path), "nframes": 6, "min_pixels": 3136}
    plan = plan_part(dict(part, max_pixels=28 * 28 * 30))
    assert len(plan.frame_indices) == 6
    assert (plan.resized_height, plan.resized_width) == (56, 56)
    plan = plan_part({"type": "video", "video": str(path), "fps": 1.0, "video_start": 2.0})
    assert plan.start_frame == 16 and len(plan.frame_indices) == 6  # 6 s at 1 fps
    video = process_part({"type": "video", "video": str(path), "nframes": 4})
    assert video.grid_thw.tolist()[0] == 2
    with pytest.raises(MediaError, match="either fps or nframes"):
        plan_part({"video": str(path), "fps": 1.0, "nframes": 4})


def test_frame_list_part_uses_sample_fps():
    frames = [Image.new("RGB", (64, 48))] * 4
    plan = plan_part({"type": "video", "video": frames, "sample_fps": 1.0})
    assert plan.timestamps == (0.0, 1.0, 2.0, 3.0)


def test_part_without_media_and_unknown_keys(caplog):
    with pytest.raises(MediaError, match="no image"):
        plan_part({"type": "text", "text": "hi"})
    plan_part({"image": Image.new("RGB", (50, 50)), "max_pixel": 5})
    assert "max_pixel" in caplog.text


def test_config_gives_the_settings_the_functions_default_to():
    assert MediaConfig().image_settings() == ImageSettings()
    assert MediaConfig().video_settings() == VideoSettings()
    config = MediaConfig.from_hf(
        dict(OFFICIAL, patch_size=16), {"size": {"shortest_edge": 50000, "longest_edge": 90000}}
    )
    image, video = config.image_settings(), config.video_settings()
    assert (image.patch_size, image.max_pixels, image.image_std) == (16, 12845056, CLIP_STD)
    assert (video.patch_size, video.max_pixels, video.max_tokens) == (16, 90000, 16384)


@pytest.mark.parametrize(
    "part,key",
    [
        ({"image": Image.new("RGB", (50, 50)), "max_pixels": "big"}, "max_pixels"),
        (
            {"image": Image.new("RGB", (50, 50)), "resized_height": 2.5, "resized_width": 9},
            "resized_height",
        ),
        ({"video": "v.mp4", "fps": "fast"}, "fps"),
        ({"video": "v.mp4", "nframes": True}, "nframes"),
        ({"video": "v.mp4", "video_start": float("nan")}, "video_start"),
        ({"video": "v.mp4", "max_tokens": 0}, "max_tokens"),
        ({"video": [Image.new("RGB", (8, 8))], "sample_fps": -1}, "sample_fps"),
    ],
)
def test_bad_part_value_is_a_media_error_naming_the_key(part, key):
    with pytest.raises(MediaError, match=key) as caught:
        plan_part(part)
    assert caught.value.param == key


def test_video_part_max_tokens_caps_the_video(make_video):
    path = str(make_video("cap.mp4", frames=64))
    uncapped = plan_part({"video": path, "fps": 8.0})
    plan = plan_part({"video": path, "fps": 8.0, "max_tokens": 300})
    assert uncapped.tokens > 300 and plan.capped and plan.tokens <= 300
