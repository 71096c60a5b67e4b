"""The one attention entry point for the ViT and the LLM.

Letters: B batch, H query heads, K key/value heads, Tq/Tk query/key lengths, D head dim.

Three ways a caller restricts attention, all through ``attention(...)``:
- ``causal=True``: each query sees keys up to its own position (queries aligned to the *end* of
  the keys, so a KV cache with Tq < Tk works);
- ``mask``: an explicit boolean [B, 1, Tq, Tk] (True = may attend), used for padded batches;
- ``cu_seqlens``: B == 1 holding several sequences packed end to end (images / video frames in the
  ViT, packed training samples in the LLM); no query crosses a boundary. We never materialise the
  block-diagonal mask: each segment is its own SDPA call (batched when all segments are equally
  long), or one flash-attn varlen call on CUDA when flash-attn is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional fast path, CUDA only
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, Tq, D], k/v [B, K, Tk, D] -> [B, H, Tq, D]; K divides H (grouped-query)."""
    if cu_seqlens is not None:
        if mask is not None:
            raise ValueError("attention: give either mask or cu_seqlens, not both")
        return varlen_attention(q, k, v, cu_seqlens, causal=causal)
    if q.shape[2] == 1 and q.device.type == "cpu":
        return one_query_attention(q, k, v, mask)  # decode: a query at the end sees every key
    if mask is None and causal and q.shape[2] == 1:
        causal = False  # one query at the end of the keys sees all of them
    if mask is None and causal and q.shape[2] != k.shape[2]:
        mask = causal_mask(None, q.shape[0], q.shape[2], k.shape[2], q.device)
    if mask is not None:
        return _sdpa(q, k, v, mask=mask, causal=False)
    return _sdpa(q, k, v, mask=None, causal=causal)


def _sdpa(q, k, v, *, mask, causal):
    gqa = q.shape[1] != k.shape[1]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)


def one_query_attention(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, 1, D] against all of k/v [B, K, Tk, D]; mask None or boolean [B, 1, 1, Tk].

    Decode on CPU: PyTorch's CPU SDPA spends about 1 us per key on a single query (18 ms for
    16k keys, measured); two grouped matmuls with a float32 softmax take a tenth of that. The
    scores are float32 whatever the dtype (as SDPA computes them).
    """
    B, H, _, D = q.shape
    K = k.shape[1]
    qg = q.reshape(B, K, H // K, D).float() * D**-0.5  # the query heads sharing each kv head
    scores = qg @ k.float().transpose(-1, -2)  # [B, K, H/K, Tk]
    if mask is not None:
        scores = scores.masked_fill(~mask.reshape(B, 1, 1, -1), float("-inf"))
    out = scores.softmax(-1) @ v.float()  # [B, K, H/K, D]
    return out.to(q.dtype).reshape(B, H, 1, D)


def causal_mask(
    attention_mask: torch.Tensor | None, B: int, Tq: int, Tk: int, device: torch.device
) -> torch.Tensor:
    """Boolean [B, 1, Tq, Tk]: causal (queries are the last Tq of Tk positions) and, with a padding
    mask [B, Tk], no attending to padding. A query always sees itself, so rows of padding queries
    are never empty (an empty row gives NaN, which would leak through 0 * NaN into later layers)."""
    qpos = torch.arange(Tk - Tq, Tk, device=device).view(Tq, 1)
    kpos = torch.arange(Tk, device=device).view(1, Tk)
    allowed = (kpos <= qpos).view(1, 1, Tq, Tk)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool().view(B, 1, 1, Tk)
        allowed = allowed | (kpos == qpos).view(1, 1, Tq, Tk)
    return allowed.expand(B, 1, Tq, Tk)


def varlen_attention(q, k, v, cu_seqlens: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Packed sequences: q [1, H, N, D], k/v [1, K, N, D], cu_seqlens [S+1] -> [1, H, N, D]."""
    if (
        flash_attn_varlen_func is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
    ):
        return _flash_varlen(q, k, v, cu_seqlens, causal)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    if len(set(lengths)) == 1:  # equal segments (one image, or the frames of a video): one call
        S, L = len(lengths), lengths[0]
        fold = lambda x: x[0].unflatten(1, (S, L)).transpose(0, 1)  # [S, H, L, D]  # noqa: E731
        out = _sdpa(fold(q), fold(k), fold(v), mask=None, causal=causal)
        return out.transpose(0, 1).flatten(1, 2).unsqueeze(0)
    parts = [
        _sdpa(qs, ks, vs, mask=None, causal=causal)
        for qs, ks, vs in zip(
            q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True
        )
    ]
    return torch.cat(parts, dim=2)


def _flash_varlen(q, k, v, cu_seqlens, causal):  # pragma: no cover - needs CUDA + flash-attn
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max())
    to_packed = lambda x: x[0].transpose(0, 1)  # [N, H, D]  # noqa: E731
    out = flash_attn_varlen_func(
        to_packed(q), to_packed(k), to_packed(v), cu, cu, max_len, max_len, causal=causal
    )
    return out.transpose(0, 1).unsqueeze(0)
