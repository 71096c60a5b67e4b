import torch

from qwen2vl.model.attention import attention, causal_mask, one_query_attention


def qkv(B, H, K, T, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, T, D, generator=g),
        torch.randn(B, K, T, D, generator=g),
        torch.randn(B, K, T, D, generator=g),
    )


def block_diagonal_reference(q, k, v, lengths, causal):
    """The naive materialised mask the fast path must equal."""
    T = q.shape[2]
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = seg.view(T, 1) == seg.view(1, T)
    if causal:
        allowed &= torch.ones(T, T, dtype=torch.bool).tril()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    return scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v


def test_varlen_equals_block_diagonal_mask_for_unequal_segments():
    q, k, v = qkv(1, 4, 2, 17)
    lengths = [5, 9, 3]
    cu = torch.tensor([0, 5, 14, 17])
    for causal in (False, True):
        out = attention(q, k, v, causal=causal, cu_seqlens=cu)
        assert torch.allclose(out, block_diagonal_reference(q, k, v, lengths, causal), atol=1e-5)


def test_varlen_equal_segments_batched_path():
    q, k, v = qkv(1, 4, 4, 12)
    out = attention(q, k, v, cu_seqlens=torch.tensor([0, 4, 8, 12]))
    assert torch.allclose(out, block_diagonal_reference(q, k, v, [4, 4, 4], False), atol=1e-5)


def test_cached_queries_align_to_the_end_of_the_keys():
    q, k, v = qkv(2, 4, 2, 10)
    full = attention(q, k, v, causal=True)
    tail = attention(q[:, :, -3:], k, v, causal=True)
    assert torch.allclose(full[:, :, -3:], tail, atol=1e-5)


def test_padding_rows_never_produce_nan():
    q, k, v = qkv(2, 2, 2, 6)
    pad = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    out = attention(q, k, v, mask=causal_mask(pad, 2, 6, 6, q.device))
    assert not out.isnan().any()
    # real tokens of the padded row equal the same tokens run without the padding
    alone = attention(q[:1, :, 3:], k[:1, :, 3:], v[:1, :, 3:], causal=True)
    assert torch.allclose(out[:1, :, 3:], alone, atol=1e-5)


def test_one_query_decode_path_equals_sdpa_with_grouped_heads_and_padding():
    torch.manual_seed(0)
    q = torch.randn(2, 6, 1, 16)
    k, v = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    pad = torch.ones(2, 9, dtype=torch.long)
    pad[1, :4] = 0  # the second row is left-padded
    mask = causal_mask(pad, 2, 1, 9, q.device)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True
    )
    assert torch.allclose(one_query_attention(q, k, v, mask), want, atol=1e-6)
    assert torch.allclose(attention(q, k, v, causal=True, mask=mask), want, atol=1e-6)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert torch.allclose(attention(q, k, v, causal=True), full, atol=1e-6)
    bf = [t.bfloat16() for t in (q, k, v)]
    got = attention(*bf, causal=True)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), full, atol=3e-2)
