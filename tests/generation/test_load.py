import os

import pytest
import torch
from tiny_qwen2vl import tiny_model

import qwen2vl
from qwen2vl.generation.compute import CPULinear, CPUPatchEmbed
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.quantize import Int8Linear


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    path = tmp_path_factory.mktemp("tied")
    qwen2vl.save_pretrained(tiny_model(seed=5, tie=True), path)
    return path


def test_cpu_load_swaps_in_the_cpu_modules_and_keeps_the_tie_and_the_keys(tied):
    model = load_for_inference(tied, "bfloat16")
    plain = qwen2vl.load_model(tied, dtype="bfloat16")
    assert list(model.state_dict()) == list(plain.state_dict())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head, CPULinear)
    assert isinstance(model.model.layers[1].self_attn.o_proj, CPULinear)
    assert isinstance(model.visual.patch_embed, CPUPatchEmbed)
    assert not model.training


def test_float32_load_computes_exactly_as_the_plain_model(tied):
    ids = torch.randint(0, 200, (1, 80))
    with torch.no_grad():
        got = load_for_inference(tied, "float32")(ids).logits
        want = qwen2vl.load_model(tied, dtype="float32")(ids).logits
    assert torch.equal(got, want)


def test_int8_load_quantises_the_llm_with_the_chosen_kernels(tied):
    model = load_for_inference(tied, "bfloat16", quantize="int8")
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, Int8Linear) and isinstance(model.lm_head, Int8Linear)
    assert down.kernels is model.visual.blocks[0].mlp.fc1.kernels


def test_loading_prints_nothing_and_leaves_the_environment_alone(tied, capfd):
    before = dict(os.environ)
    load_for_inference(tied, "bfloat16", quantize="int8")
    assert dict(os.environ) == before
    assert capfd.readouterr() == ("", "")


def test_an_unknown_quantisation_is_refused_before_reading_anything(tmp_path):
    with pytest.raises(ValueError, match="int3"):
        load_for_inference(tmp_path / "missing", quantize="int3")
