import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_qwen2vl import tiny_config

import qwen2vl
from qwen2vl.errors import CheckpointError, ConfigError


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = qwen2vl.Qwen2VL(tiny_config())
    qwen2vl.save_pretrained(model, tmp_path / "ckpt", max_shard_bytes=60_000)
    return model, tmp_path / "ckpt"


def logits(model):
    return model(torch.tensor([[1, 2, 3, 4]])).logits


def test_save_load_round_trip_is_exact(saved):
    model, path = saved
    assert torch.equal(logits(qwen2vl.load_model(path)), logits(model))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", torch.float32])
def test_dtype_on_load(saved, dtype):
    model = qwen2vl.load_model(saved[1], dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    assert {p.dtype for p in model.parameters()} == {want}
    assert logits(model).isfinite().all()


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    model = qwen2vl.Qwen2VL(tiny_config(tie=True))
    qwen2vl.save_pretrained(model, tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = qwen2vl.load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_missing_shard(saved):
    path = saved[1]
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard.name}"):
        qwen2vl.load_model(path)


def test_truncated_file(saved):
    shard = sorted(saved[1].glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        qwen2vl.load_model(saved[1])


def test_zero_byte_file(saved):
    sorted(saved[1].glob("model-*.safetensors"))[0].write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        qwen2vl.load_model(saved[1])


def test_wrong_shapes_and_missing_and_unexpected_keys_in_one_error(tmp_path):
    model = qwen2vl.Qwen2VL(tiny_config())
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["model.norm.weight"] = torch.ones(7)
    del state["visual.merger.ln_q.bias"]
    state["visual.extra.weight"] = torch.ones(1)
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf()))
    with pytest.raises(CheckpointError) as e:
        qwen2vl.load_model(tmp_path)
    msg = str(e.value)
    assert "missing (1): visual.merger.ln_q.bias" in msg
    assert "unexpected (1): visual.extra.weight" in msg
    assert "model.norm.weight: checkpoint (7,), config wants (32,)" in msg


def test_unknown_model_type(saved):
    cfg_file = saved[1] / "config.json"
    cfg_file.write_text(json.dumps(json.loads(cfg_file.read_text()) | {"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type='llama'"):
        qwen2vl.load_model(saved[1])


def test_pickle_only_checkpoint_says_how_to_convert(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="safe_serialization=True"):
        qwen2vl.load_model(tmp_path)


def test_not_a_directory_and_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        qwen2vl.load_model(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        qwen2vl.load_model(tmp_path)


def test_unsupported_dtype(saved):
    with pytest.raises(CheckpointError, match="int8"):
        qwen2vl.load_model(saved[1], dtype="int8")


def test_resave_over_a_sharded_checkpoint_leaves_one_layout(saved):
    model, path = saved
    qwen2vl.save_pretrained(model, path)
    assert not (path / "model.safetensors.index.json").exists()
    assert torch.equal(logits(qwen2vl.load_model(path)), logits(model))


def test_joined_model_checks_feature_token_counts():
    model = qwen2vl.Qwen2VL(tiny_config())
    with pytest.raises(qwen2vl.Qwen2VLError, match="0 features, 1 image tokens"):
        model(torch.tensor([[1, 250, 2]]))
    with pytest.raises(qwen2vl.Qwen2VLError, match="do not match"):
        model(
            torch.tensor([[1, 250, 2]]),
            pixel_values=torch.randn(16, 1176),
            image_grid_thw=torch.tensor([[1, 4, 4]]),
        )


def test_a_checkpoint_of_the_other_family_is_refused_naming_the_keys(tmp_path):
    from dataclasses import replace

    qwen2 = tiny_config()
    model = qwen2vl.Qwen2VL(qwen2)
    qwen2vl.save_pretrained(model, tmp_path)
    vision = replace(
        qwen2.vision, norm="rmsnorm", mlp="gated", window_size=112, tokens_per_second=2
    )
    qwen25 = replace(qwen2, vision=vision, model_type="qwen2_5_vl")
    (tmp_path / "config.json").write_text(json.dumps(qwen25.to_hf()))
    with pytest.raises(CheckpointError) as e:
        qwen2vl.load_model(tmp_path)
    assert "missing" in str(e.value) and "visual.blocks.0.mlp.gate_proj.weight" in str(e.value)
    assert "unexpected" in str(e.value) and "visual.blocks.0.mlp.fc1.weight" in str(e.value)


@pytest.mark.parametrize("method", ["awq", "gptq", "qwen2vl"])
def test_a_quantised_checkpoint_is_refused_in_one_line_before_its_weights(tmp_path, method):
    config = tiny_config().to_hf() | {"quantization_config": {"quant_method": method, "bits": 4}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match=f"quant_method='{method}'") as e:
        qwen2vl.load_model(tmp_path)
    assert "\n" not in str(e.value)


def test_a_quantisation_nested_in_text_config_is_refused_too(tmp_path):
    config = tiny_config().to_hf()
    config["text_config"] = {"quantization_config": {"quant_method": "gptq"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="quant_method='gptq'"):
        qwen2vl.load_model(tmp_path)
