"""fp32 logits of qwen2vl equal transformers' on tiny random checkpoints (max |diff| <= 1e-4)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import CASES, IMAGE, VIDEO, batch, transformers

import qwen2vl

TOL = 1e-4


def reference_logits(hf, inputs):
    ids = inputs["input_ids"]
    extra = {"mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int()}
    with torch.no_grad():
        return hf(**inputs, **extra).logits


def assert_parity(model, hf, inputs):
    with torch.no_grad():
        ours = model(**inputs).logits
    ref = reference_logits(hf, inputs)
    real = inputs["attention_mask"].bool()  # padding positions carry no meaning in either
    diff = (ours - ref).abs()[real].max().item()
    assert diff <= TOL, f"max |diff| {diff}"


@pytest.fixture(scope="module")
def ours_untied(saved_untied):
    return qwen2vl.load_model(saved_untied, dtype="float32")


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, ours_untied, hf_untied):
    assert_parity(ours_untied, hf_untied, batch(*CASES[case]))


def test_tied_embeddings_checkpoint(saved_tied, hf_tied):
    model = qwen2vl.load_model(saved_tied, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_parity(model, hf_tied, batch(*CASES["image_and_video"]))


def test_loss_matches_transformers(ours_untied, hf_untied):
    inputs = batch(*CASES["one_image"])
    labels = inputs["input_ids"].clone()
    labels[:, :20] = -100
    ids = inputs["input_ids"]
    extra = {"mm_token_type_ids": (ids == IMAGE).int()}
    with torch.no_grad():
        ref = hf_untied(**inputs, **extra, labels=labels).loss
        ours = ours_untied(**inputs, labels=labels).loss
    assert abs(ours.item() - ref.item()) <= TOL


def test_checkpoint_saved_by_qwen2vl_loads_in_transformers(ours_untied, hf_untied, tmp_path):
    qwen2vl.save_pretrained(ours_untied, tmp_path / "ours")
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        tmp_path / "ours", dtype=torch.float32
    ).eval()
    assert_parity(ours_untied, hf, batch(*CASES["image_and_video"]))


def test_sharded_save_round_trips(ours_untied, hf_untied, tmp_path):
    qwen2vl.save_pretrained(ours_untied, tmp_path, max_shard_bytes=4 * 2**20)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_parity(
        qwen2vl.load_model(tmp_path, dtype="float32"), hf_untied, batch(*CASES["one_image"])
    )


def test_flat_official_config_style(saved_untied, hf_untied, tmp_path):
    """Rewrite transformers' nested config.json into the official flat style."""
    nested = json.loads((saved_untied / "config.json").read_text())
    text, vision = nested["text_config"], nested["vision_config"]
    flat = {
        k: text[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "hidden_act",
            "max_position_embeddings",
        )
    }
    flat |= {
        "model_type": "qwen2_vl",
        "rope_theta": 1e6,
        "torch_dtype": "float32",
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision["depth"],
            "embed_dim": vision["embed_dim"],
            "num_heads": vision["num_heads"],
            "in_chans": 3,
            "hidden_size": vision["hidden_size"],
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(flat))
    (tmp_path / "model.safetensors").symlink_to(saved_untied / "model.safetensors")
    model = qwen2vl.load_model(tmp_path)
    assert model.lm_head.weight.dtype == torch.float32
    assert_parity(model, hf_untied, batch(*CASES["one_video"]))


def test_transformers5_runtime_key_names(saved_untied, hf_untied, tmp_path):
    state = load_file(saved_untied / "model.safetensors")
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
    (tmp_path / "config.json").write_text((saved_untied / "config.json").read_text())
    assert_parity(
        qwen2vl.load_model(tmp_path, dtype="float32"), hf_untied, batch(*CASES["one_image"])
    )


@pytest.mark.parametrize("name", ["2B", "7B", "72B"])
def test_presets_have_reference_parameter_counts(name):
    cfg = qwen2vl.preset(name)
    hf_cfg = transformers.Qwen2VLConfig(**cfg.to_hf())
    with torch.device("meta"):
        ours = qwen2vl.Qwen2VL(cfg)
        ref = transformers.Qwen2VLForConditionalGeneration(hf_cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(ref)
    assert count(ours.visual) == count(ref.model.visual)
