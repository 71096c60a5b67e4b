"""Keys and values of prompt prefixes kept across requests, in blocks of ``BLOCK`` tokens.

Letters: L layers, K key/value heads, D head dim, B block tokens, P prompt tokens.

A block is found by a hash chained over everything up to its end: the token ids and, for each
visual item whose placeholder tokens start inside it, the item's key (a hash of its pixels after
resizing and of its patch grid, so of the media content and the resize settings). A block so
matches only when the whole prompt up to its end is the same, media included: the same text with
an image that differs in one pixel never reuses one. Keys and values of a token depend only on
the tokens before it (and their M-RoPE positions, which follow from the same ids and grids), so a
matching block's keys and values are exactly what prefilling it again would compute.

Memory is bounded (``max_bytes``); the least recently used block goes first. A lookup refreshes
the blocks it matched deepest first, so a prefix's first block outlives its later ones and a
chain is never left without its head while its tail is kept.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import torch

BLOCK = 16


def block_hashes(
    ids: Sequence[int], visuals: Sequence[tuple[int, str]], block: int = BLOCK
) -> list[bytes]:
    """The chained hash of each whole block of ``ids``; ``visuals``: (index of the item's first
    placeholder token, its key), in prompt order."""
    out, h, v = [], b"", 0
    for lo in range(0, len(ids) - block + 1, block):
        m = hashlib.sha256(h)
        m.update(array("q", ids[lo : lo + block]).tobytes())
        while v < len(visuals) and visuals[v][0] < lo + block:
            m.update(b"\0" + visuals[v][1].encode())
            v += 1
        h = m.digest()
        out.append(h)
    return out


def visual_starts(ids: Sequence[int], pad_ids: set[int]) -> list[int]:
    """Index of the first token of each run of placeholder tokens: one run per visual item."""
    return [i for i, t in enumerate(ids) if t in pad_ids and (i == 0 or ids[i - 1] != t)]


class PrefixCache:
    def __init__(self, max_bytes: int, block: int = BLOCK):
        self.max_bytes, self.block = max_bytes, block
        self.blocks: OrderedDict[bytes, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.bytes = 0

    def match(self, hashes: Sequence[bytes]) -> int:
        """How many leading blocks of a prompt are held."""
        n = 0
        while n < len(hashes) and hashes[n] in self.blocks:
            n += 1
        return n

    def load(self, hashes: Sequence[bytes]) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values [L, K, n*B, D] of held blocks, in order; refreshes them."""
        for h in reversed(hashes):
            self.blocks.move_to_end(h)
        ks, vs = zip(*(self.blocks[h] for h in hashes), strict=True)
        return torch.cat(ks, dim=2), torch.cat(vs, dim=2)

    def store(self, hashes: Sequence[bytes], k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep the blocks of one prompt (k/v [L, K, >= n*B, D]) that are not held yet: as many
        leading ones as the bound allows, older blocks of other prompts evicted for them."""
        B = self.block
        size = 2 * k[:, :, :B].numel() * k.element_size()
        keep = hashes[: self.max_bytes // size]
        for i, h in enumerate(keep):
            if h not in self.blocks:
                self.blocks[h] = (
                    k[:, :, i * B : (i + 1) * B].clone(),
                    v[:, :, i * B : (i + 1) * B].clone(),
                )
                self.bytes += size
        for h in reversed(keep):
            self.blocks.move_to_end(h)
        while self.bytes > self.max_bytes:
            _, (old, _) = self.blocks.popitem(last=False)
            self.bytes -= 2 * old.numel() * old.element_size()
