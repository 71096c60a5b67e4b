"""The compiled per-token operations (decode_ops.cpp) against the modules they stand in for."""

import platform

import pytest
import torch
from tiny_qwen2vl import tiny_model

from qwen2vl.generation import gemv
from qwen2vl.generation.compute import (
    CPUAttention,
    CPUDecoderLayer,
    CPULinear,
    CPURMSNorm,
    Kernels,
    cpu_matmuls,
)
from qwen2vl.generation.kv_cache import KVCache
from qwen2vl.generation.quantize import quantize_int4, quantize_int8
from qwen2vl.model.attention import one_query_attention
from qwen2vl.model.rope import apply_rotary
from qwen2vl.model.text import RMSNorm

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the kernel is built for x86-64 only"
)
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
KERNELS = Kernels(gemv=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
def test_rms_norm_equals_the_module(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(1536, 1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(generator=g)
    x = (torch.randn(rows, 1, 1536, generator=g) * 50).to(dtype)
    with torch.no_grad():
        want = norm(x)
    got = gemv.rms_norm(x, norm.weight, norm.eps)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:  # the mean square summed in another order
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # rounded where the module rounds: the statistics' last bit never shows
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_equals_apply_rotary_on_every_head(dtype):
    g = torch.Generator().manual_seed(0)
    B, heads, D = 3, 4, 128
    x = torch.randn(B, 1, heads * D, generator=g).to(dtype)
    cos, sin = torch.randn(2, B, 1, D, generator=g).to(dtype)
    want = apply_rotary(x.view(B, 1, heads, D).transpose(1, 2), cos[:, None], sin[:, None])
    got = gemv.rotary(x, cos, sin, D).view(B, 1, heads, D).transpose(1, 2)
    tol = 0 if dtype != torch.float32 else 1e-6  # float32: the sum may be fused
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_equals_the_reference_on_cache_views(dtype, masked):
    g = torch.Generator().manual_seed(1)
    B, H, K, S, D = 3, 12, 2, 77, 128
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    cache = torch.randn(2, B, K, 100, D, generator=g).to(dtype)  # views of the first S slots
    k, v = cache[0, :, :, :S], cache[1, :, :, :S]
    mask = torch.rand(B, 1, 1, S, generator=g) > 0.3 if masked else None
    want = one_query_attention(q, k, v, mask)
    got = gemv.one_query_attention(q, k, v, mask)
    assert got.dtype == dtype and got.shape == want.shape
    # float32 scores and sums in another order; one rounding to the dtype at the end
    tol = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


def test_bad_shapes_are_refused():
    x = torch.randn(1, 1, 100)
    with pytest.raises(RuntimeError, match="rms_norm"):
        gemv.rms_norm(x, torch.ones(99), 1e-6)
    with pytest.raises(RuntimeError, match="rotary"):
        gemv.rotary(x, torch.ones(1, 1, 64), torch.ones(1, 1, 64), 64)  # 100 is not heads of 64
    q, k = torch.randn(1, 3, 1, 8), torch.randn(1, 2, 5, 8)  # 2 kv heads do not divide 3
    with pytest.raises(RuntimeError, match="one_query_attention"):
        gemv.one_query_attention(q, k, k)


def decoder_layers(dtype):
    model = tiny_model(seed=0).to(dtype)
    return model, cpu_matmuls(tiny_model(seed=0).to(dtype), KERNELS)


def test_swapped_modules_hold_the_same_parameters_and_swapped_children():
    plain, fast = decoder_layers(torch.float32)
    layer = fast.model.layers[0]
    assert type(layer.self_attn) is CPUAttention and type(layer.input_layernorm) is CPURMSNorm
    assert type(layer.self_attn.q_proj) is CPULinear  # children swapped before their parent
    assert list(fast.state_dict()) == list(plain.state_dict())
    for (name, a), b in zip(fast.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_steps_match_the_reference_modules(dtype):
    plain, fast = decoder_layers(dtype)
    cfg = plain.cfg.text
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    caches = [KVCache(cfg, 2, 16, dtype=dtype) for _ in range(2)]
    with torch.inference_mode():
        for model, cache in zip((plain, fast), caches, strict=True):
            model(ids[:, :6], kv_cache=cache)  # prefill: the same path in both
            cache.commit(6)
        # left padding in row 1: the decode steps' attention takes a mask
        padding = torch.ones(2, 9, dtype=torch.long)
        padding[1, :2] = 0
        for t in range(6, 9):  # decode steps: the compiled operations in `fast` only
            pos = torch.full((2, 1), t)
            mask = padding[:, : t + 1]
            want = plain(ids[:, t : t + 1], mask, position_ids=pos, kv_cache=caches[0]).logits
            got = fast(ids[:, t : t + 1], mask, position_ids=pos, kv_cache=caches[1]).logits
            for cache in caches:
                cache.commit(1)
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_training_takes_the_reference_path():
    norm = CPURMSNorm(RMSNorm(64, 1e-6), KERNELS)
    x = torch.randn(1, 1, 64, requires_grad=True)
    norm(x).sum().backward()  # gradients enabled: the module's own forward, differentiable
    assert x.grad is not None


def decode(model, steps: int = 3):
    """Logits of ``steps`` decode steps of two rows (row 1 left-padded) after a prefill of 6,
    and the KV cache they leave."""
    cfg = model.cfg.text
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, cfg.vocab_size, (2, 6 + steps), generator=g)
    padding = torch.ones(2, 6 + steps, dtype=torch.long)
    padding[1, :2] = 0
    cache = KVCache(cfg, 2, 16, dtype=torch.bfloat16)
    logits = []
    with torch.inference_mode():
        model(ids[:, :6], padding[:, :6], kv_cache=cache)
        cache.commit(6)
        for t in range(6, 6 + steps):
            step = ids[:, t : t + 1], padding[:, : t + 1]
            logits.append(model(*step, position_ids=torch.full((2, 1), t), kv_cache=cache).logits)
            cache.commit(1)
    return torch.cat(logits, 1), cache


@pytest.mark.parametrize("weights", ["bf16", "int8", "int4"])
def test_compiled_layer_step_gives_the_modules_bits(weights, monkeypatch):
    model = cpu_matmuls(tiny_model(seed=0).bfloat16(), KERNELS)
    if weights == "int8":
        quantize_int8(model, kernels=KERNELS)
    elif weights == "int4":
        quantize_int4(model, kernels=KERNELS)
    assert all(type(layer) is CPUDecoderLayer for layer in model.model.layers)
    calls = []
    compiled = gemv.attention_inputs
    monkeypatch.setattr(gemv, "attention_inputs", lambda *a: calls.append(1) or compiled(*a))
    got, got_cache = decode(model)
    assert len(calls) == 3 * len(model.model.layers)  # every layer's every decode step
    monkeypatch.setattr(CPUDecoderLayer, "_operands", lambda *a: None)  # module by module
    want, want_cache = decode(model)
    assert len(calls) == 3 * len(model.model.layers)
    assert torch.equal(got, want)
    assert torch.equal(got_cache.k, want_cache.k) and torch.equal(got_cache.v, want_cache.v)


def test_layer_step_leaves_other_linears_to_the_modules(monkeypatch):
    model = cpu_matmuls(tiny_model(seed=0).bfloat16(), KERNELS)
    attn = model.model.layers[1].self_attn
    attn.o_proj = torch.nn.Linear(attn.o_proj.in_features, attn.o_proj.out_features).bfloat16()
    calls = []
    compiled = gemv.attention_inputs
    monkeypatch.setattr(gemv, "attention_inputs", lambda *a: calls.append(1) or compiled(*a))
    got, _ = decode(model)
    assert len(calls) == 3  # layer 0 only: layer 1's o_proj (a LoRA, say) gives no operands
    monkeypatch.setattr(CPUDecoderLayer, "_operands", lambda *a: None)
    assert torch.equal(got, decode(model)[0])
