"""float16 tracks float32: norm statistics are taken in float32, so activations whose mean
square is beyond float16 (65504) still normalise (tests/parity/test_float16_parity.py: the
same as transformers)."""

import torch
from tiny_qwen2vl import IMAGE, VEND, VSTART, tiny_model

from qwen2vl.model.text import RMSNorm

PATCH = 3 * 2 * 14 * 14


def image_prompt() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 2, 3, VSTART] + [IMAGE] * 12 + [VEND] + list(range(10, 30))])
    pixels = torch.randn(48, PATCH, generator=g)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 6, 8]])}


def relative_error(model, inputs) -> float:
    """|float16 logits - float32 logits| / |float32 logits| (Frobenius norms)."""
    with torch.no_grad():
        want = model.float()(**inputs).logits
        got = model.half()(**inputs).logits
    assert got.dtype == torch.float16 and got.isfinite().all()
    return ((got.float() - want).norm() / want.norm()).item()


def test_rms_norm_of_values_beyond_float16_squares():
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 1000
    assert x.half().pow(2).mean(-1).isinf().all()  # a float16 mean square would be inf
    got = norm.half()(x.half())
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), norm.float()(x), rtol=1e-3, atol=1e-3)


def test_float16_logits_stay_close_to_float32():
    # measured 0.0030: float16 rounding of peaked logits (max |logit| 7.9)
    assert relative_error(tiny_model(seed=0), image_prompt()) < 1e-2


def test_float16_logits_stay_close_with_norm_inputs_beyond_float16():
    model = tiny_model(seed=0)
    with torch.no_grad():  # mean squares ~1e6 (text embeddings) and ~1e8 (patch embeddings)
        model.model.embed_tokens.weight.mul_(1000)
        model.visual.patch_embed.proj.weight.mul_(1000)
    assert relative_error(model, image_prompt()) < 1e-2  # measured 0.0008
