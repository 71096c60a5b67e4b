"""float16 runs equal transformers' float16 runs (tiny random models, CPU).

transformers keeps half precision finite by upcasting in these places only, and so do we:
RMSNorm statistics in float32 (Qwen2VLRMSNorm; the LLM and Qwen2.5-VL's ViT), the ViT's rotary
in float32 (apply_rotary_pos_emb_vision), attention scores and softmax in float32 (inside torch's
SDPA and flash kernels; eager_attention_forward's softmax), LayerNorm statistics in float32
(inside torch). The LLM's rotary runs in the activations' dtype, and nothing clamps: a residual
stream beyond float16's range (65504) becomes inf, then NaN, in both.
"""

import pytest
import tiny
import torch
from tiny import TEXT, batch, prompt, transformers
from tiny_qwen2vl import IMAGE, VEND, VSTART, tiny_model
from tiny_qwen25 import hf_model as qwen25_model

import qwen2vl
from qwen2vl.generation.generate import Generator, generate
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.sampling import SamplingParams

PATCH = 3 * 2 * 14 * 14
# max |logit difference| / max |logit|: measured 0 on these inputs (the same ops in the same
# order); a few float16 steps of slack. Dropping either float32 upcast (RMSNorm, ViT rotary)
# moves them by about 2.5x this (measured).
TOL = 2e-3


def image_prompt() -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 2, 3, VSTART] + [IMAGE] * 12 + [VEND] + list(range(10, 30))])
    pixels = torch.randn(48, PATCH, generator=g)
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 6, 8]])}


def checkpoint(path, edit=None):
    """tiny_model(seed=0), edited in place by ``edit``, saved to path."""
    model = tiny_model(seed=0)
    if edit is not None:
        with torch.no_grad():
            edit(model)
    qwen2vl.save_pretrained(model, path)
    return path


def float16_pair(path):
    ours = qwen2vl.load_model(path, dtype="float16")
    ref = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float16)
    return ours, ref.eval()


def logits_of(ours, ref, inputs):
    types = (inputs["input_ids"] == IMAGE).int()
    with torch.no_grad():
        a = ours(**inputs).logits
        b = ref(**inputs, mm_token_type_ids=types).logits
    assert a.dtype == b.dtype == torch.float16
    return a.float(), b.float()


def assert_close(a, b):
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    assert diff <= TOL * scale, f"max |diff| {diff} at logit scale {scale}"


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return checkpoint(tmp_path_factory.mktemp("fp16_plain"))


def test_float16_logits_match_transformers(plain):
    ours, ref = float16_pair(plain)
    a, b = logits_of(ours, ref, image_prompt())
    assert a.isfinite().all()
    assert_close(a, b)


def test_float16_greedy_matches_transformers_generate(plain):
    """Also through load_for_inference: its CPU decode kernel takes no float16 weights, so the
    matmuls fall back to PyTorch's."""
    ours, ref = float16_pair(plain)
    inputs = image_prompt()
    with torch.no_grad():
        out = ref.generate(
            **inputs,
            mm_token_type_ids=(inputs["input_ids"] == IMAGE).int(),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=[0],
            pad_token_id=0,
        )
    want = out[:, inputs["input_ids"].shape[1] :].tolist()
    params = SamplingParams(max_new_tokens=20)
    assert generate(ours, inputs, params, stop_token_ids=[0]) == want
    model = load_for_inference(plain, "float16")
    assert generate(model, inputs, params, stop_token_ids=[0]) == want


def test_float16_activations_through_the_int8_kernel_stay_near_float16(plain):
    """int8 weights take the CPU decode kernel with float16 activations (quantised to int8 per
    group in it, so no longer equal to the float16 model): every decode step's logits stay finite
    and near the float16 model's, fed the same tokens."""
    inputs = image_prompt()
    params = SamplingParams(max_new_tokens=8)
    half = Generator.start(load_for_inference(plain, "float16"), inputs, params, stop_token_ids=[])
    int8 = Generator.start(
        load_for_inference(plain, "float16", quantize="int8"), inputs, params, stop_token_ids=[]
    )
    for _ in range(params.max_new_tokens - 1):
        assert int8.logits.dtype == torch.float16
        int8.logits = half.logits  # so the int8 model is fed the float16 model's choice
        tokens = half.step().tokens
        int8.step()
        a, b = int8.logits.float(), half.logits.float()
        assert a.isfinite().all()
        # measured up to 0.067 of the logit scale on this random model; its int8 weights on
        # PyTorch's path alone (float16 activations) move them up to 0.061
        assert (a - b).abs().max() <= 0.1 * b.abs().max(), tokens


def big_activations(model):
    """Norm inputs whose mean square is beyond float16 (text embeddings ~1e3, patch embeddings
    ~1e4), and query/key pairs whose dot products are beyond it (LLM and ViT)."""
    model.model.embed_tokens.weight.mul_(1000)
    model.visual.patch_embed.proj.weight.mul_(1000)
    model.visual.blocks[0].attn.qkv.weight.mul_(100)
    for layer in model.model.layers:
        layer.self_attn.q_proj.weight.mul_(100)
        layer.self_attn.k_proj.weight.mul_(100)


def test_sums_beyond_float16_stay_finite_as_in_transformers(tmp_path):
    ours, ref = float16_pair(checkpoint(tmp_path, big_activations))
    inputs = image_prompt()
    with torch.no_grad():  # the precondition: without the upcasts these would be inf
        embeds = ours.model.embed_tokens(inputs["input_ids"])  # [1, T, E]
        patches = ours.visual.patch_embed(inputs["pixel_values"])  # [N, C]
        attn = ours.model.layers[0].self_attn
        x = ours.model.layers[0].input_layernorm(embeds)
        q, k = attn.q_proj(x)[..., : attn.head_dim], attn.k_proj(x)[..., : attn.head_dim]
    assert embeds.dtype == torch.float16
    assert embeds.pow(2).mean(-1).isinf().all() and patches.pow(2).mean(-1).isinf().all()
    assert (q @ k.transpose(-1, -2)).isinf().any()
    a, b = logits_of(ours, ref, inputs)
    assert a.isfinite().all() and b.isfinite().all()
    assert_close(a, b)


def test_a_residual_stream_beyond_float16_is_nan_as_in_transformers(tmp_path):
    """Neither clamps: the first layer's MLP output overflows to inf, its norm makes NaN, and
    greedy picks token 0 (the "!!!!" of a real checkpoint) in both."""

    def overflow(model):
        model.model.layers[0].mlp.down_proj.weight.mul_(1e4)

    ours, ref = float16_pair(checkpoint(tmp_path, overflow))
    a, b = logits_of(ours, ref, image_prompt())
    assert b.isnan().all()
    assert a.isnan().all() and (a.argmax(-1) == 0).all()


def test_qwen25_float16_is_as_accurate_as_transformers(tmp_path):
    """Against float32 logits. Not equal to transformers' float16 ones: our patch embedding is a
    matmul, theirs a Conv3d, and the two round a few outputs one float16 step apart (in float32,
    1e-6 apart); 4 ViT blocks of large random weights grow that to 0.0076 of the logit scale
    (measured). Relative error to float32, measured: 0.00518 ours, 0.00526 transformers'."""
    hf = qwen25_model()
    with torch.no_grad():  # larger weights: peaked logits, so float16 rounding shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.save_pretrained(tmp_path)
    inputs = batch(prompt(("image", (1, 20, 28)), TEXT))  # several 8x8-patch windows
    types = (inputs["input_ids"] == tiny.IMAGE).int()
    load = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained
    with torch.no_grad():
        want = load(tmp_path, dtype=torch.float32).eval()(**inputs, mm_token_type_ids=types)
        ref = load(tmp_path, dtype=torch.float16).eval()(**inputs, mm_token_type_ids=types)
        ours = qwen2vl.load_model(tmp_path, dtype="float16")(**inputs)

    def error(out) -> float:
        return ((out.logits.float() - want.logits).norm() / want.logits.norm()).item()

    assert ours.logits.isfinite().all()
    assert error(ours) <= 1.25 * error(ref), (error(ours), error(ref))
