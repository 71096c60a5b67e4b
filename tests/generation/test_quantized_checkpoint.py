import json

import pytest
import torch
from safetensors import safe_open
from tiny_qwen2vl import tiny_model

import qwen2vl
from qwen2vl.cli import main
from qwen2vl.errors import CheckpointError
from qwen2vl.generation import quantize, quantized_checkpoint
from qwen2vl.generation.generate import Generator
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.quantize import Int4Linear, Int8Linear
from qwen2vl.generation.quantized_checkpoint import save_quantized
from qwen2vl.generation.sampling import SamplingParams


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("source")
    qwen2vl.save_pretrained(tiny_model(seed=6, tie=True), path)  # tied, as the 2B is
    return path


@pytest.mark.parametrize("bits", [8, 4])
def test_saved_then_loaded_gives_the_logits_of_quantising_in_memory(source, tmp_path, bits):
    save_quantized(source, tmp_path / "q", bits=bits)
    ids = torch.randint(0, 200, (2, 70))  # prefill rows, then decode rows below
    with torch.no_grad():
        loaded = load_for_inference(tmp_path / "q")
        memory = load_for_inference(source, quantize=f"int{bits}")
        assert torch.equal(loaded(ids).logits, memory(ids).logits)
        assert torch.equal(loaded(ids[:, :3]).logits, memory(ids[:, :3]).logits)
    kind = Int4Linear if bits == 4 else Int8Linear
    assert isinstance(loaded.model.layers[1].mlp.down_proj, kind)
    assert isinstance(loaded.lm_head, Int8Linear)
    assert loaded.lm_head.kernels is loaded.model.layers[0].mlp.down_proj.kernels


def test_config_documents_the_format(source, tmp_path):
    save_quantized(source, tmp_path / "q", bits=4)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    spec = config["quantization_config"]
    assert (spec["quant_method"], spec["bits"], spec["group_size"]) == ("qwen2vl", 4, 64)
    assert spec["modules"]["lm_head"] == 8
    assert spec["modules"]["model.layers.0.self_attn.q_proj"] == 4
    assert len(spec["modules"]) == 2 * 7 + 1
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "U8"
        assert f.get_slice("model.layers.0.mlp.up_proj.scales").get_dtype() == "F16"


def test_loading_reads_the_stored_weights_without_quantising(source, tmp_path, monkeypatch):
    save_quantized(source, tmp_path / "q", bits=4)

    def fail(w, group=quantize.GROUP):
        raise AssertionError("a stored checkpoint was quantised again")

    monkeypatch.setattr(quantize, "quantize_groups", fail)
    load_for_inference(tmp_path / "q")


@pytest.mark.parametrize("method", ["awq", "gptq", "bitsandbytes"])
def test_other_quantised_formats_are_refused_in_one_line_before_reading_weights(
    source, tmp_path, method, no_weights, monkeypatch
):
    def fail(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(quantized_checkpoint, "read_state_dict", fail)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"not read")
    with pytest.raises(CheckpointError) as e:
        load_for_inference(tmp_path)
    message = str(e.value)
    assert f"{method} quantised checkpoints" in message and "not supported yet" in message
    assert "\n" not in message and len(message) < 400


def test_a_stored_int4_checkpoint_refuses_another_quantisation(source, tmp_path):
    save_quantized(source, tmp_path / "q", bits=4)
    with pytest.raises(CheckpointError, match="holds int4 weights"):
        load_for_inference(tmp_path / "q", quantize="int8")
    load_for_inference(tmp_path / "q", quantize="int4")  # the same: allowed


def test_quantize_command_writes_a_checkpoint_that_chats(tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", "--output", str(out), "--bits", "4"]) == 0  # the default model
    assert "wrote an int4 checkpoint" in capsys.readouterr().out
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    pipe = qwen2vl.Pipeline.from_pretrained(out)
    assert isinstance(pipe.model.model.layers[0].mlp.gate_proj, Int4Linear)
    batch = pipe.processor([{"role": "user", "content": "hello"}], add_generation_prompt=True)
    gen = Generator.start(pipe.model, batch, SamplingParams(max_new_tokens=4), stop_token_ids=[])
    assert len(list(gen)) == 4
    assert main(["quantize", "--model", str(out), "--output", str(tmp_path / "x"), "--bits", "8"])
    assert "already quantised" in capsys.readouterr().err
