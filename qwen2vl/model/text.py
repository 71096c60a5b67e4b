"""The Qwen2 decoder: GQA attention with q/k/v bias, RMSNorm, SwiGLU MLP, M-RoPE.

Letters: B batch, T tokens of this call, S tokens attended to (cache + T), E hidden size,
H query heads, K key/value heads, D head dim.

The decoder takes already-embedded inputs (visual features scattered in by the joined model) and
the rotary cos/sin for every token; how attention is restricted (causal, padding mask, packed
cu_seqlens) and where past keys/values live (``kv_cache``) are passed in, never kept here.
A ``kv_cache`` is any object with ``update(layer_idx, k, v) -> (k_all, v_all)`` taking this
call's k/v [B, K, T, D] and returning every key/value the queries may attend to [B, K, S, D].
A ``DecoderTaps`` asks one call for values from inside the decoder (training objectives).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import TextConfig
from qwen2vl.model.attention import attention
from qwen2vl.model.rope import apply_rotary


class KVCache(Protocol):
    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class DecoderTaps:
    """Values inside the decoder that one forward call hands out, at the point it makes them.

    ``attention_input[i](x, cos, sin)`` is called with layer i's attention input (after its norm;
    x [B, T, E], cos/sin [B, T, D]) and ``layer_output[i](h)`` with layer i's output [B, T, E]. A
    loss built from them joins the autograd graph in forward order, so its gradients sum in the
    same order as if it were part of the model. They live for one call: nothing stays on modules.
    """

    attention_input: dict[int, Callable[..., None]] = field(default_factory=dict)
    layer_output: dict[int, Callable[[torch.Tensor], None]] = field(default_factory=dict)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics, as the reference: in float16 the mean square is inf from |x| ~ 256
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, *, mask=None, cu_seqlens=None, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,T,D]
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B,K,T,D]
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # [B, K, S, D]
        out = attention(q, k, v, causal=True, mask=mask, cu_seqlens=cu_seqlens)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, *, mask=None, cu_seqlens=None, kv_cache=None, tap=None):
        h = self.input_layernorm(x)
        if tap is not None:  # a DecoderTaps.attention_input entry
            tap(h, cos, sin)
        x = x + self.self_attn(h, cos, sin, mask=mask, cu_seqlens=cu_seqlens, kv_cache=kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    """Embeddings, decoder layers and the final norm (the checkpoint's ``model.*``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        taps: DecoderTaps | None = None,
    ) -> torch.Tensor:
        """x [B, T, E] embeddings, cos/sin [B, T, D] -> final hidden states [B, T, E]."""
        taps = taps or DecoderTaps()
        for i, layer in enumerate(self.layers):
            tap = taps.attention_input.get(i)
            # A tapped layer runs whole: recomputing it in backward would call its tap again.
            if self.gradient_checkpointing and self.training and kv_cache is None and tap is None:
                x = torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask=mask, cu_seqlens=cu_seqlens, use_reentrant=False
                )
            else:
                x = layer(x, cos, sin, mask=mask, cu_seqlens=cu_seqlens, kv_cache=kv_cache, tap=tap)
            if i in taps.layer_output:
                taps.layer_output[i](x)
        return self.norm(x)
