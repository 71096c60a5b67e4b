import pytest
import torch
from tiny_qwen2vl import IMAGE, VEND, VSTART, tiny_model

from qwen2vl.errors import Qwen2VLError
from qwen2vl.generation import gemv
from qwen2vl.generation.compute import Kernels
from qwen2vl.generation.generate import Generator, generate
from qwen2vl.generation.kv_cache import KVCache
from qwen2vl.generation.quantize import Int8Linear, quantize_int8
from qwen2vl.generation.sampling import SamplingParams, apply_repetition_penalty, top_k_top_p


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def padded_batch():
    g = torch.Generator().manual_seed(0)
    a = [5, 6, VSTART] + [IMAGE] * 4 + [VEND, 7, 8]
    b = [9, 10, 11, 12, VSTART] + [IMAGE] * 6 + [VEND, 13]
    T = max(len(a), len(b))
    ids = torch.tensor([[0] * (T - len(a)) + a, [0] * (T - len(b)) + b])
    mask = torch.tensor([[0] * (T - len(a)) + [1] * len(a), [0] * (T - len(b)) + [1] * len(b)])
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(16 + 24, 1176, generator=g),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 6]]),
    }


def naive_greedy(model, row_batch, n):
    """Reference: recompute the whole sequence for every new token, no cache."""
    ids = row_batch["input_ids"]
    visual = {k: v for k, v in row_batch.items() if k in ("pixel_values", "image_grid_thw")}
    out = []
    for _ in range(n):
        with torch.no_grad():
            logits = model(ids, **visual).logits[:, -1]
        tok = int(logits.argmax(-1))
        out.append(tok)
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


def test_cached_generation_equals_full_recompute_for_each_padded_row(model):
    batch = padded_batch()
    got = generate(model, batch, SamplingParams(max_new_tokens=12), stop_token_ids=[])
    mask = batch["attention_mask"].bool()
    offsets = [0, 16]
    for b, n_pix in enumerate([16, 24]):
        row = {
            "input_ids": batch["input_ids"][b][mask[b]][None],
            "pixel_values": batch["pixel_values"][offsets[b] : offsets[b] + n_pix],
            "image_grid_thw": batch["image_grid_thw"][b : b + 1],
        }
        assert got[b] == naive_greedy(model, row, 12)


def test_stop_tokens_finish_rows_separately(model):
    batch = padded_batch()
    free = generate(model, batch, SamplingParams(max_new_tokens=10), stop_token_ids=[])
    stop = free[0][3]
    got = generate(model, batch, SamplingParams(max_new_tokens=10), stop_token_ids=[stop])
    for row_free, row in zip(free, got, strict=True):
        cut = row_free.index(stop) + 1 if stop in row_free else len(row_free)
        assert row == row_free[:cut]


def test_seeded_sampling_is_reproducible(model):
    batch = padded_batch()
    p = dict(max_new_tokens=16, temperature=1.5, top_p=0.95, top_k=50)
    a = generate(model, batch, SamplingParams(**p, seed=1), stop_token_ids=[])
    b = generate(model, batch, SamplingParams(**p, seed=1), stop_token_ids=[])
    c = generate(model, batch, SamplingParams(**p, seed=2), stop_token_ids=[])
    assert a == b and a != c


def test_top_k_one_is_greedy(model):
    batch = padded_batch()
    greedy = generate(model, batch, SamplingParams(max_new_tokens=8), stop_token_ids=[])
    topk1 = generate(
        model,
        batch,
        SamplingParams(max_new_tokens=8, temperature=0.7, top_k=1, seed=3),
        stop_token_ids=[],
    )
    assert greedy == topk1


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = top_k_top_p(logits, 0, 0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    assert top_k_top_p(logits, 2, 1.0).isfinite().tolist() == [[True, True, False, False]]


def test_repetition_penalty_follows_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_repetition_penalty_changes_greedy_output(model):
    batch = padded_batch()
    plain = generate(model, batch, SamplingParams(max_new_tokens=20), stop_token_ids=[])
    penal = generate(
        model, batch, SamplingParams(max_new_tokens=20, repetition_penalty=5.0), stop_token_ids=[]
    )
    assert plain != penal
    assert sum(len(set(r)) for r in penal) >= sum(len(set(r)) for r in plain)


def test_logprobs_are_log_probabilities(model):
    gen = Generator.start(
        model, padded_batch(), SamplingParams(max_new_tokens=3, logprobs=True), stop_token_ids=[]
    )
    for step in gen:
        assert (step.logprobs <= 0).all()


def test_bad_sampling_params_are_clear_errors():
    with pytest.raises(Qwen2VLError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(Qwen2VLError, match="max_new_tokens"):
        SamplingParams(max_new_tokens=0)


def test_cache_overflow_is_a_clear_error(model):
    cache = KVCache(model.cfg.text, 1, 4, dtype=torch.float32)
    with pytest.raises(Qwen2VLError, match="KV cache full"):
        model(torch.tensor([[1, 2, 3, 4, 5]]), kv_cache=cache)


def test_int8_logits_stay_close_to_bf16():
    model = tiny_model(seed=4).to(torch.bfloat16)
    batch = padded_batch()
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with torch.no_grad():
        ref = model(**batch).logits.float()
        quantize_int8(model)
        q = model(**batch).logits.float()
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear)
    assert isinstance(model.lm_head, Int8Linear)
    assert not isinstance(model.visual.blocks[0].attn.qkv, Int8Linear)
    rel = (q - ref).norm() / ref.norm()
    assert rel < 0.03, rel


@pytest.mark.parametrize("kernel", [True, False])
def test_int8_decode_rows_match_dequantised_weights(kernel):
    if kernel and not gemv.available():
        pytest.skip("the GEMV kernel is unavailable here")
    lin = torch.nn.Linear(16, 8)
    q = Int8Linear(lin, Kernels(gemv=kernel))
    x = torch.randn(3, 16)
    want = x @ (q.weight.float() * q.scales[:, None]).t() + lin.bias
    assert torch.allclose(q(x), want, atol=1e-5)
