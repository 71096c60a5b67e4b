"""SlotCache against a plain list per sequence: adds, removals (row moves), decode writes and
compaction keep every sequence's keys/values in order, and the mask marks exactly them."""

from __future__ import annotations

import random

import torch

from qwen2vl.config import TextConfig
from qwen2vl.serve.slots import SlotCache

CFG = TextConfig(
    vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=1, mrope_section=[1, 1, 0],
)  # fmt: skip


def stored(cache: SlotCache, row: int) -> torch.Tensor:
    """The row's valid keys in column order: [L, K, length, D]."""
    return cache.k[:, row, :, cache.valid[row]]


def test_random_operations_keep_every_sequence_intact():
    rng = random.Random(0)
    cache = SlotCache(CFG, 3, 24, dtype=torch.float32)
    seqs: list[list[torch.Tensor]] = []  # per row: the keys [L, K, D] of each token, in order
    L, K, D = CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim
    for _ in range(300):
        op = rng.random()
        if op < 0.2 and cache.n < cache.slots:
            P = rng.randint(1, 12)
            k = torch.randn(L, K, P, D)
            assert cache.add(k, k.clone()) == len(seqs)
            seqs.append([k[:, :, i] for i in range(P)])
        elif op < 0.3 and cache.n:
            row = rng.randrange(cache.n)
            moved = cache.remove(row)
            seqs[row] = seqs[-1]
            seqs.pop()
            assert moved == (None if row == len(seqs) else len(seqs))
        elif cache.n and max(len(s) for s in seqs) < 20:  # a sequence never outgrows its room
            mask = cache.begin_step()
            new = torch.randn(cache.n, K, 1, D)
            for layer in range(L):
                k_all, _ = cache.update(layer, new, new)
                assert k_all.shape[2] == mask.shape[1] and k_all.data_ptr() >= cache.k.data_ptr()
                assert torch.equal(k_all[:, :, -1], new[:, :, 0])  # own token is the last column
            cache.end_step()
            for row, seq in enumerate(seqs):
                seq.append(new[row, :, 0].expand(L, K, D))
        assert cache.lengths() == [len(s) for s in seqs]
        for row, seq in enumerate(seqs):
            assert torch.equal(stored(cache, row), torch.stack(seq, dim=2))
            assert torch.equal(cache.v[:, row, :, cache.valid[row]], stored(cache, row))
    assert cache.compactions > 0


def test_compaction_right_aligns_and_removes_gaps():
    cache = SlotCache(CFG, 2, 10, dtype=torch.float32)
    L, K, D = CFG.num_hidden_layers, CFG.num_key_value_heads, CFG.head_dim
    cache.add(torch.ones(L, K, 2, D), torch.ones(L, K, 2, D))
    cache.add(torch.ones(L, K, 6, D), torch.ones(L, K, 6, D))  # row 0 now has a gap
    assert cache.col == 6 and cache.valid[0].tolist()[:6] == [True, True] + [False] * 4
    cache.compact()
    assert cache.col == 6 and cache.valid[0].nonzero().flatten().tolist() == [4, 5]
    assert cache.remove(0) == 1 and cache.n == 1 and cache.lengths() == [6]
    cache.remove(0)
    assert cache.n == 0 and cache.col == 0
