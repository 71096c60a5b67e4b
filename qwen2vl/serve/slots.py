"""The KV cache of the running sequences: one row (slot) per sequence, one shared write column.

Letters: L layers, N slots, K key/value heads, C columns (capacity), D head dim, n running rows.

Rows are laid out like a left-padded batch: every decode step writes each running row's new key at
the same column ``col``, so the model's query (the last attended column) is each row's own token
and ``update`` returns a view, never a copy. A newly admitted sequence's prefill keys are placed
right-aligned to end at ``col``; columns a row does not own are masked out (``valid``). Positions
are carried by the rotary embedding already applied to the keys, so gaps between a row's columns
change nothing. Running rows occupy rows [0, n): a finished row is replaced by the last one (one
copy when a sequence ends), so the decode batch is a slice. When ``col`` reaches the capacity,
``compact`` right-aligns every row again without its gaps (a full copy, once in a while).
"""

from __future__ import annotations

import torch

from qwen2vl.config import TextConfig


class SlotCache:
    def __init__(
        self,
        cfg: TextConfig,
        slots: int,
        capacity: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        shape = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads, capacity, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.valid = torch.zeros(slots, capacity, dtype=torch.bool, device=device)  # [N, C]
        self.start = [0] * slots  # first valid column of each row
        self.n = 0  # running rows: [0, n)
        self.col = 0  # the column the next decode step writes
        self.compactions = 0

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    def lengths(self) -> list[int]:
        return self.valid[: self.n].sum(1).tolist()

    # ---- admission and release -------------------------------------------------------------

    def add(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Place one prefilled sequence (k/v [L, K, P, D]) in a new row ending at ``col``."""
        if self.n == self.slots:
            raise RuntimeError("no free slot")  # the scheduler checks first: a bug if reached
        P = k.shape[2]
        if self.col + 1 > self.capacity:
            self.compact()
        if self.col < P:  # other rows get masked gap columns; compaction removes them later
            self.col = P
        row, lo = self.n, self.col - P
        self.k[:, row, :, lo : self.col] = k
        self.v[:, row, :, lo : self.col] = v
        self.valid[row] = False
        self.valid[row, lo : self.col] = True
        self.start[row] = lo
        self.n += 1
        return row

    def remove(self, row: int) -> int | None:
        """Free a row; the last running row moves into it. Returns the row that moved (or None)."""
        last = self.n - 1
        moved = None
        if row != last:
            lo = self.start[last]
            self.k[:, row, :, lo : self.col] = self.k[:, last, :, lo : self.col]
            self.v[:, row, :, lo : self.col] = self.v[:, last, :, lo : self.col]
            self.valid[row] = self.valid[last]
            self.start[row] = lo
            moved = last
        self.valid[last] = False
        self.n = last
        if self.n == 0:
            self.col = 0  # an empty cache starts over at column 0 for free
        return moved

    # ---- one decode step ---------------------------------------------------------------------

    def begin_step(self) -> torch.Tensor:
        """Make room for one column; mark it valid in every running row; return the padding mask
        [n, S] over the columns this step attends (S = col + 1 - lowest start)."""
        if self.col + 1 > self.capacity:
            self.compact()
        self.valid[: self.n, self.col] = True
        return self.valid[: self.n, self._low() : self.col + 1]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """k/v [n, K, 1, D] written at ``col``; returns views [n, K, S, D] (model KV protocol)."""
        lo, c, n = self._low(), self.col, self.n
        self.k[layer_idx, :n, :, c] = k[:, :, 0]
        self.v[layer_idx, :n, :, c] = v[:, :, 0]
        return self.k[layer_idx, :n, :, lo : c + 1], self.v[layer_idx, :n, :, lo : c + 1]

    def end_step(self) -> None:
        self.col += 1

    def _low(self) -> int:
        return min(self.start[: self.n], default=self.col)

    # ---- housekeeping ------------------------------------------------------------------------

    def compact(self) -> None:
        """Right-align every running row's valid columns at the new ``col`` = the longest row."""
        lengths = self.lengths()
        new_col = max(lengths, default=0)
        if new_col + 1 > self.capacity:
            raise RuntimeError(f"slot cache overflow: a row holds {new_col} tokens")
        for row, length in enumerate(lengths):
            cols = self.valid[row].nonzero().flatten()  # advanced indexing copies: no overlap
            lo = new_col - length
            self.k[:, row, :, lo:new_col] = self.k[:, row, :, cols]
            self.v[:, row, :, lo:new_col] = self.v[:, row, :, cols]
            self.valid[row] = False
            self.valid[row, lo:new_col] = True
            self.start[row] = lo
        self.col = new_col
        self.compactions += 1
