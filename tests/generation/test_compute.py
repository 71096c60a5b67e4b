import pytest
import torch
from tiny_qwen2vl import tiny_model

from qwen2vl.generation import compute, gemv
from qwen2vl.generation.compute import MIN_ROWS, CPULinear, cpu_matmuls
from qwen2vl.generation.quantize import Int8Linear, quantize_int8


@pytest.mark.parametrize("slow", [True, False])
def test_many_rows_run_in_float32_only_where_half_matmuls_are_slow(slow, monkeypatch):
    monkeypatch.setattr(compute, "half_matmul_is_slow", lambda dtype: slow)
    lin = torch.nn.Linear(64, 32).bfloat16()
    ref = torch.nn.Linear(64, 32).bfloat16()
    ref.load_state_dict(lin.state_dict())
    cpu_matmuls(lin)
    assert isinstance(lin, CPULinear)
    x = torch.randn(MIN_ROWS, 64).bfloat16()
    exact = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert torch.equal(lin(x), exact.bfloat16() if slow else ref(x))


def test_decode_rows_take_the_gemv_kernel(monkeypatch):
    lin = cpu_matmuls(torch.nn.Linear(64, 32).bfloat16())
    x = torch.randn(3, 64).bfloat16()
    exact = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    if gemv.available():
        assert torch.equal(lin(x), gemv.linear(x, lin.weight, bias=lin.bias))
    assert torch.allclose(lin(x).float(), exact, rtol=2**-7, atol=1e-3)
    monkeypatch.setattr(gemv, "available", lambda: False)  # PyTorch's kernel instead
    assert torch.allclose(lin(x).float(), exact, rtol=2**-7, atol=1e-3)


def test_half_matmul_speed_is_measured_once_per_dtype():
    compute.half_matmul_is_slow.cache_clear()
    first = compute.half_matmul_is_slow(torch.bfloat16)
    assert compute.half_matmul_is_slow(torch.bfloat16) is first
    assert compute.half_matmul_is_slow.cache_info().hits == 1


def test_cpu_model_keeps_its_state_dict_and_is_no_less_accurate_than_bf16():
    model = tiny_model(seed=2)
    ids = torch.randint(0, 200, (1, MIN_ROWS + 5))
    with torch.no_grad():
        want = model(ids).logits
        plain = model.bfloat16()(ids).logits.float()
    names = list(model.state_dict())
    model = cpu_matmuls(model)
    assert list(model.state_dict()) == names
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got - want).norm() <= (plain - want).norm()


@pytest.mark.parametrize("slow", [True, False])
def test_int8_prefill_path_uses_dequantised_weights(slow, monkeypatch):
    monkeypatch.setattr(compute, "half_matmul_is_slow", lambda dtype: slow)
    lin = torch.nn.Linear(32, 16)
    q = Int8Linear(lin)
    x = torch.randn(MIN_ROWS, 32).bfloat16()
    w = q.weight.double() * q.scales.double()[:, None]
    want = x.double() @ w.T + lin.bias.double()
    got = q(x)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want, rtol=2**-7, atol=2e-2)


def test_quantize_after_cpu_matmuls_swaps_all_llm_linears():
    model = cpu_matmuls(tiny_model(seed=3).bfloat16())
    quantize_int8(model)
    assert all(isinstance(layer.mlp.down_proj, Int8Linear) for layer in model.model.layers)
    assert isinstance(model.visual.blocks[0].mlp.fc1, CPULinear)
