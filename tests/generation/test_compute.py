import torch
from tiny_qwen2vl import tiny_model

from qwen2vl.generation.compute import MIN_ROWS, UpcastLinear, upcast_matmuls
from qwen2vl.generation.quantize import Int8Linear, quantize_int8


def test_many_rows_run_in_float32_few_rows_in_storage_dtype():
    lin = torch.nn.Linear(64, 32).bfloat16()
    ref = torch.nn.Linear(64, 32).bfloat16()
    ref.load_state_dict(lin.state_dict())
    upcast_matmuls(lin)
    assert isinstance(lin, UpcastLinear)
    x = torch.randn(MIN_ROWS, 64).bfloat16()
    exact = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    assert torch.equal(lin(x), exact.bfloat16())
    assert torch.equal(lin(x[:3]), ref(x[:3]))  # decode rows: the plain bf16 kernel


def test_upcast_model_keeps_its_state_dict_and_is_no_less_accurate_than_bf16():
    model = tiny_model(seed=2)
    ids = torch.randint(0, 200, (1, MIN_ROWS + 5))
    with torch.no_grad():
        want = model(ids).logits
        plain = model.bfloat16()(ids).logits.float()
    names = list(model.state_dict())
    model = upcast_matmuls(model)
    assert list(model.state_dict()) == names
    with torch.no_grad():
        got = model(ids).logits.float()
    assert (got - want).norm() <= (plain - want).norm()


def test_int8_prefill_path_uses_dequantised_weights():
    lin = torch.nn.Linear(32, 16)
    q = Int8Linear(lin, torch.bfloat16)
    x = torch.randn(MIN_ROWS, 32).bfloat16()
    w = q.weight.float() * q.scales.float()[:, None]
    want = torch.nn.functional.linear(x.float(), w).bfloat16() + lin.bias.bfloat16()
    assert torch.allclose(q(x).float(), want.float(), atol=1e-2)


def test_quantize_after_upcast_swaps_all_llm_linears():
    model = upcast_matmuls(tiny_model(seed=3).bfloat16())
    quantize_int8(model)
    assert all(isinstance(layer.mlp.down_proj, Int8Linear) for layer in model.model.layers)
    assert isinstance(model.visual.blocks[0].mlp.fc1, UpcastLinear)
