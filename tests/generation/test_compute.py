import logging

import pytest
import torch
from tiny_qwen2vl import tiny_model

from qwen2vl.generation import compute, gemv
from qwen2vl.generation.compute import (
    MIN_ROWS,
    PYTORCH_ONLY,
    CPULinear,
    CPUPatchEmbed,
    Kernels,
    cpu_matmuls,
)
from qwen2vl.generation.quantize import Int8Linear, quantize_int8


@pytest.mark.parametrize("widen", [True, False])
def test_many_rows_run_in_float32_only_where_chosen(widen):
    lin = torch.nn.Linear(64, 32).bfloat16()
    ref = torch.nn.Linear(64, 32).bfloat16()
    ref.load_state_dict(lin.state_dict())
    lin = cpu_matmuls(lin, Kernels(widen=widen))
    assert isinstance(lin, CPULinear)
    x = torch.randn(MIN_ROWS, 64).bfloat16()
    exact = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert torch.equal(lin(x), exact.bfloat16() if widen else ref(x))


def test_decode_rows_take_the_gemv_kernel_only_where_chosen():
    lin = torch.nn.Linear(64, 32).bfloat16()
    x = torch.randn(3, 64).bfloat16()
    exact = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    plain = lin(x)
    if gemv.available():
        fast = cpu_matmuls(lin, Kernels(gemv=True))
        assert torch.equal(fast(x), gemv.linear(x, lin.weight, bias=lin.bias))
        assert torch.allclose(fast(x).float(), exact, rtol=2**-7, atol=1e-3)
    assert torch.equal(cpu_matmuls(lin, PYTORCH_ONLY)(x), plain)


def test_half_matmul_speed_is_measured_once_per_dtype():
    compute.half_matmul_is_slow.cache_clear()
    first = compute.half_matmul_is_slow(torch.bfloat16)
    assert compute.half_matmul_is_slow(torch.bfloat16) is first
    assert compute.half_matmul_is_slow.cache_info().hits == 1


def test_speed_probe_times_both_ways_in_turn_after_a_warm_up_each():
    calls = []
    times = compute._best_times(lambda: calls.append("a"), lambda: calls.append("b"), rounds=3)
    assert calls == ["a", "b"] * 4
    assert len(times) == 2 and all(t >= 0 for t in times)


def test_kernel_choice_is_made_once_and_logged(caplog, monkeypatch):
    monkeypatch.setattr(gemv, "available", lambda: pytest.fail("float32 weights need no kernel"))
    compute.choose_kernels.cache_clear()
    with caplog.at_level(logging.INFO, logger="qwen2vl.generation.compute"):
        first = compute.choose_kernels(torch.float32)
        assert compute.choose_kernels(torch.float32) is first
    compute.choose_kernels.cache_clear()
    assert first == Kernels(gemv=False, widen=False)
    assert [r.getMessage() for r in caplog.records] == [
        "CPU matmuls for float32 weights: decode rows by PyTorch; "
        "prefill and vision matmuls in float32"
    ]


def test_swap_keeps_parameter_objects_tied_weights_and_state_dict_keys():
    model = tiny_model(seed=1, tie=True).bfloat16()
    before = dict(model.named_parameters(remove_duplicate=False))
    keys = list(model.state_dict())
    cpu_matmuls(model, Kernels(gemv=True, widen=True))
    after = dict(model.named_parameters(remove_duplicate=False))
    assert list(model.state_dict()) == keys
    assert after.keys() == before.keys()
    assert all(after[name] is p for name, p in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head, CPULinear)
    assert isinstance(model.model.layers[0].mlp.down_proj, CPULinear)
    assert isinstance(model.visual.patch_embed, CPUPatchEmbed)


def test_pytorch_only_swap_leaves_outputs_bit_identical():
    model = tiny_model(seed=2).bfloat16()
    ids = torch.randint(0, 200, (1, MIN_ROWS + 5))
    pixels = torch.randn(MIN_ROWS, model.visual.patch_embed.proj.weight[0].numel())
    with torch.no_grad():
        want = model(ids).logits, model.visual.patch_embed(pixels)
        cpu_matmuls(model, PYTORCH_ONLY)
        got = model(ids).logits, model.visual.patch_embed(pixels)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_widened_model_is_no_less_accurate_than_bf16(monkeypatch):
    model = tiny_model(seed=2)
    ids = torch.randint(0, 200, (1, MIN_ROWS + 5))
    widened = []  # CPUs whose bf16 matmuls accumulate in float32 can give equal logits
    monkeypatch.setattr(compute, "widened", lambda w: widened.append(w) or w.float())
    with torch.no_grad():
        want = model(ids).logits
        plain = model.bfloat16()(ids).logits.float()
        got = cpu_matmuls(model, Kernels(widen=True))(ids).logits.float()
    assert len(widened) == 7 * len(model.model.layers) + 1  # every LLM linear and lm_head
    assert (got - want).norm() <= (plain - want).norm()


@pytest.mark.parametrize("widen", [True, False])
def test_int8_prefill_path_uses_dequantised_weights(widen):
    lin = torch.nn.Linear(32, 16)
    q = Int8Linear(lin, Kernels(widen=widen))
    x = torch.randn(MIN_ROWS, 32).bfloat16()
    w = q.weight.double() * q.scales.double()[:, None]
    want = x.double() @ w.T + lin.bias.double()
    got = q(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want, rtol=2**-7, atol=2e-2)


def test_quantize_after_cpu_matmuls_swaps_all_llm_linears_and_passes_the_kernels_on():
    kernels = Kernels(widen=True)
    model = cpu_matmuls(tiny_model(seed=3).bfloat16(), kernels)
    quantize_int8(model, kernels=kernels)
    assert all(isinstance(layer.mlp.down_proj, Int8Linear) for layer in model.model.layers)
    assert model.model.layers[0].mlp.down_proj.kernels is kernels
    assert isinstance(model.visual.blocks[0].mlp.fc1, CPULinear)
