"""Qwen2.5-VL: fp32 logits of qwen2vl equal transformers' on a tiny random checkpoint (max |diff|
<= 1e-4), greedy generation is token-identical, and saves load both ways.

The tiny ViT windows are 8x8 patches; the images below have sides that are not multiples of 8,
so every image has several windows and partial ones at its right and bottom edges.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import IMAGE, STOP, TEXT, VIDEO, batch, prompt, reference, transformers
from tiny_qwen25 import hf_model

import qwen2vl
from qwen2vl.generation.generate import generate
from qwen2vl.generation.sampling import SamplingParams

TOL = 1e-4

# (prompts, second_per_grid_ts of the videos in order; None: none given, transformers' 1.0)
CASES = {
    "text_only": ([prompt(TEXT)], None),
    "one_image": ([prompt(("image", (1, 20, 28)), TEXT)], None),
    "two_images_different_sizes": (
        [prompt(("image", (1, 20, 28)), TEXT, ("image", (1, 12, 36)))],
        None,
    ),
    # 2 fps: temporal_patch_size 2 / 2 fps = 1 s per grid step, ids 0, 2 (tokens_per_second 2)
    "video_fps2": ([prompt(("video", (2, 12, 20)), TEXT)], [1.0]),
    # 4 fps: 0.5 s per grid step, ids 0, 1, 2, 3 (a release truncating 0.5 to int gave 0, 0, 0, 0)
    "video_fps4": ([prompt(("video", (4, 8, 12)), TEXT)], [0.5]),
    "image_and_video": ([prompt(("image", (1, 12, 20)), ("video", (2, 8, 18)), TEXT)], [1.0]),
    "left_padded_batch": (
        [
            prompt(("image", (1, 8, 10)), TEXT),
            prompt(TEXT, ("image", (1, 20, 12)), ("text", [11, 12, 13])),
        ],
        None,
    ),
}


def inputs_of(case):
    prompts, seconds = CASES[case]
    inputs = batch(*prompts)
    if seconds is not None:
        inputs["second_per_grid_ts"] = torch.tensor(seconds)
    return inputs


def reference_logits(hf, inputs, **extra):
    ids = inputs["input_ids"]
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    with torch.no_grad():
        return hf(**inputs, mm_token_type_ids=types, **extra).logits


def max_diff(model, hf, inputs, **extra):
    with torch.no_grad():
        ours = model(**inputs).logits
    real = inputs["attention_mask"].bool()  # padding positions carry no meaning in either
    return (ours - reference_logits(hf, inputs, **extra)).abs()[real].max().item()


@pytest.fixture(scope="module")
def hf():
    return hf_model()


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen25")
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ours(saved):
    return qwen2vl.load_model(saved, dtype="float32")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, ours, hf):
    assert max_diff(ours, hf, inputs_of(case)) <= TOL


def test_video_at_1fps_follows_the_original_position_rule(ours, hf):
    """1 fps: 2 s per grid step, temporal ids 0, 4, 8 (floor(t * 2.0 * 2)); the text after the
    video continues at max(all ids) + 1 = 9 past the video start, as the original release.
    transformers 5.24 continues it at start + max(h, w) = start + 6 instead, so the reference
    gets the original positions passed in."""
    inputs = batch(prompt(("video", (3, 8, 12)), TEXT))
    inputs["second_per_grid_ts"] = torch.tensor([2.0])
    ids = inputs["input_ids"][0].tolist()
    start = ids.index(VIDEO)
    pos, _ = ours.positions(
        inputs["input_ids"], None, None, inputs["video_grid_thw"], inputs["second_per_grid_ts"]
    )
    video = pos[:, 0, start : start + 3 * 4 * 6] - start
    assert sorted(set(video[0].tolist())) == [0, 4, 8]
    assert video[0].view(3, 24)[:, 0].tolist() == [0, 4, 8]
    assert video[1].max() == 3 and video[2].max() == 5
    assert pos[0, 0, start + 72] - start == 9  # <|vision_end|>
    assert max_diff(ours, hf, inputs, position_ids=pos) <= TOL


@pytest.mark.parametrize("case", ["text_only", "one_image", "video_fps2", "left_padded_batch"])
def test_greedy_matches_transformers_generate(case, ours, hf):
    inputs = inputs_of(case)
    inputs.pop("second_per_grid_ts", None)  # 1.0 (2 fps) is both generators' default
    got = generate(ours, inputs, SamplingParams(max_new_tokens=64), stop_token_ids=STOP)
    assert got == reference(hf, inputs, 64)
    assert all(len(r) == 64 or r[-1] in STOP for r in got)


def test_saved_by_qwen2vl_loads_in_transformers(ours, tmp_path):
    qwen2vl.save_pretrained(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl"
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        tmp_path / "ours", dtype=torch.float32
    ).eval()
    assert max_diff(ours, theirs, inputs_of("image_and_video")) <= TOL
    again = qwen2vl.load_model(tmp_path / "ours", dtype="float32")
    assert again.cfg == ours.cfg


def test_transformers5_runtime_key_names(saved, hf, tmp_path):
    state = load_file(saved / "model.safetensors")
    assert any(k.startswith("visual.") for k in state)  # saved in the released layout
    renamed = {
        (
            k.replace("model.", "model.language_model.", 1)
            if k.startswith("model.")
            else "model." + k
            if k.startswith("visual.")
            else k
        ): v
        for k, v in state.items()
    }
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((saved / "config.json").read_text())
    model = qwen2vl.load_model(tmp_path, dtype="float32")
    assert max_diff(model, hf, inputs_of("one_image")) <= TOL


def test_official_flat_config_style(saved, hf, tmp_path):
    """transformers' nested config.json rewritten in the style Qwen2.5-VL releases ship."""
    nested = json.loads((saved / "config.json").read_text())
    text, vision = nested["text_config"], nested["vision_config"]
    flat = {k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size")}
    flat |= {k: text[k] for k in ("num_hidden_layers", "num_attention_heads")}
    flat |= {
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "num_key_value_heads": text["num_key_value_heads"],
        "rms_norm_eps": text["rms_norm_eps"],
        "rope_theta": 1e6,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "torch_dtype": "float32",
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision["depth"],
            "hidden_act": "silu",
            "hidden_size": vision["hidden_size"],
            "intermediate_size": vision["intermediate_size"],
            "num_heads": vision["num_heads"],
            "in_chans": 3,
            "out_hidden_size": vision["out_hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            "fullatt_block_indexes": vision["fullatt_block_indexes"],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(flat))
    (tmp_path / "model.safetensors").symlink_to(saved / "model.safetensors")
    model = qwen2vl.load_model(tmp_path)
    assert model.cfg.vision.window_size == 112 and model.cfg.vision.embed_dim == 32
    assert max_diff(model, hf, inputs_of("video_fps2")) <= TOL


@pytest.mark.parametrize("name", ["2.5-3B", "2.5-7B", "2.5-32B", "2.5-72B"])
def test_presets_have_reference_parameter_counts(name):
    cfg = qwen2vl.preset(name)
    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf())
    with torch.device("meta"):
        ours = qwen2vl.Qwen2VL(cfg)
        ref = transformers.Qwen2_5_VLForConditionalGeneration(hf_cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(ref)
    assert count(ours.visual) == count(ref.model.visual)
