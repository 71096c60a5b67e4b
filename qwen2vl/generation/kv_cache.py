"""A preallocated (static) key/value cache, passed explicitly into the model's forward.

Letters: L layers, B batch, K key/value heads, S capacity in tokens, D head dim.

Rows of a batch advance together (left padding keeps them aligned), so one ``length`` describes
the whole cache. A forward call writes its T new keys/values at ``length`` in every layer through
``update``; the caller then moves ``length`` on with ``commit(T)``. ``truncate(n)`` forgets
everything after the first n tokens, which is how a multi-turn chat reuses an unchanged prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen2vl.config import TextConfig
from qwen2vl.errors import Qwen2VLError


class KVCache(nn.Module):
    def __init__(
        self,
        cfg: TextConfig,
        batch: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store k/v [B, K, T, D] after the committed tokens; return [B, K, length + T, D]."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise Qwen2VLError(f"KV cache full: {end} tokens needed, capacity {self.capacity}")
        self.k[layer_idx, :, :, self.length : end] = k
        self.v[layer_idx, :, :, self.length : end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def commit(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} tokens to {n}")
        self.length = n
