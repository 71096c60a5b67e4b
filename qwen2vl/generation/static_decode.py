"""A decode step of fixed shapes, captured once as a CUDA graph and replayed for every token.

Letters: L layers, B rows, K key/value heads, S cache capacity, D head dim, V vocabulary.

Decode of a small model on a fast GPU is bound by kernel launches, not by memory: a CUDA graph
launches the whole step at once. A graph replays fixed kernels on fixed addresses, so the step
may change only the *contents* of its tensors: the new keys/values are scattered at each row's
``lengths`` (a tensor), attention runs over the whole capacity with the columns past each row's
length masked, and positions come from a tensor. Nothing in ``decode_step`` reads a tensor into
Python (no ``.item()``, no branch on data), and every shape depends on (B, S) only.

Manual capture rather than ``torch.compile(mode="reduce-overhead")``: the graph replays the very
kernels of the eager step, so it is exactly the eager result (the CPU tests prove the eager step
against the dynamic path); no compile time or Triton, and no recompiles per batch size. The step
stays compile-clean (no graph breaks, tested), so compiling it for fusion can be added on top.
"""

from __future__ import annotations

import logging

import torch

from qwen2vl.generation.kv_cache import KVCache
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.model.rope import mrope_cos_sin

log = logging.getLogger(__name__)


class StaticKVCache:
    """The model's ``kv_cache`` for one static step: writes this step's k/v [B, K, 1, D] at
    column ``lengths[b]`` of each row and hands back the whole capacity [B, K, S, D]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor):
        self.k, self.v, self.lengths = k, v, lengths  # [L, B, K, S, D] x2, [B]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        B, K, _, D = k.shape
        at = self.lengths.view(B, 1, 1, 1).expand(B, K, 1, D)
        self.k[layer_idx].scatter_(2, at, k)
        self.v[layer_idx].scatter_(2, at, v)
        return self.k[layer_idx], self.v[layer_idx]


def decode_step(
    model: Qwen2VL,
    cache: StaticKVCache,
    ids: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
) -> torch.Tensor:
    """One token per row: ids [B, 1], M-RoPE positions [3, B, 1], valid [B, S] (False where a row
    may never attend: padding) -> logits [B, V]. Row b attends to columns 0..lengths[b]."""
    S = cache.k.shape[3]
    cols = torch.arange(S, device=ids.device)
    lengths = cache.lengths[:, None]  # [B, 1]
    # A query always sees itself (as ``causal_mask``), so no row is empty.
    mask = ((cols <= lengths) & valid) | (cols == lengths)  # [B, S]
    x = model.model.embed_tokens(ids)  # [B, 1, E]
    t = model.cfg.text
    cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, x.dtype)
    h = model.model(x, cos, sin, mask=mask[:, None, None, :], kv_cache=cache)  # [B, 1, E]
    return model.lm_head(h[:, -1])


class StaticDecoder:
    """Static inputs and one captured graph per row count over the rows of a cache.

    ``cache`` is a ``KVCache`` (or any object with k/v buffers [L, B, K, S, D]); its buffers are
    shared, not copied: a prefill into ``cache`` is what the step sees, and what the step writes
    stays in ``cache`` for whoever reuses it. A call with n rows uses the cache's first n rows.
    ``valid`` [B, S] bool: a mask buffer read at every step (e.g. a slot cache's, written in
    place by its owner); by default the decoder's own, set by ``set_valid``. On CUDA the first
    call with n rows captures the step (after a warm-up on the capture stream) and later calls
    replay it; elsewhere the same step runs eagerly.
    A graph holds the addresses of the cache, the weights and the static buffers; it is
    valid only while this decoder and its cache live and the model is not moved or re-cast.
    """

    def __init__(self, model: Qwen2VL, cache: KVCache, *, valid: torch.Tensor | None = None):
        self.model, self.k, self.v = model, cache.k, cache.v
        B, S, device = cache.k.shape[1], cache.capacity, cache.k.device
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(3, B, 1, dtype=torch.long, device=device)
        self.lengths = torch.zeros(B, dtype=torch.long, device=device)
        self.valid = torch.ones(B, S, dtype=torch.bool, device=device) if valid is None else valid
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor] | None] = {}

    def set_valid(self, valid: torch.Tensor | None) -> None:
        """Which columns each row may attend to, [n, S'] with S' <= S (the rest stay allowed);
        None allows all. Written into the static buffer, so captured graphs see it."""
        self.valid.fill_(True)
        if valid is not None:
            self.valid[: valid.shape[0], : valid.shape[1]] = valid.bool()

    def __call__(
        self, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        """ids [n, 1], positions [3, n, 1], lengths [n] (tokens already in each row's cache: the
        new token goes there) -> logits [n, V], a fresh tensor."""
        n = ids.shape[0]
        self.ids[:n].copy_(ids)
        self.positions[:, :n].copy_(positions)
        self.lengths[:n].copy_(lengths)
        with torch.inference_mode():
            if not self.k.is_cuda:
                return self._step(n)
            if n not in self.graphs:
                self.graphs[n] = self._capture_or_none(n)
            if self.graphs[n] is None:
                return self._step(n)
            graph, logits = self.graphs[n]
            graph.replay()
            return logits.clone()

    def _step(self, n: int) -> torch.Tensor:
        cache = StaticKVCache(self.k[:, :n], self.v[:, :n], self.lengths[:n])
        return decode_step(self.model, cache, self.ids[:n], self.positions[:, :n], self.valid[:n])

    def _capture_or_none(self, n: int):
        """The graph for n rows, or None (then the same step runs eagerly) where capture fails:
        a model with an operation CUDA graphs cannot hold still decodes, only slower."""
        try:
            return self._capture(n)
        except RuntimeError as e:
            log.warning("CUDA graph capture failed for %d rows (%s); decoding without it", n, e)
            return None

    def _capture(self, n: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up on the stream that captures (lazy cuBLAS/allocator setup must not happen during
        # capture). It writes this step's k/v at ``lengths``, the same values the replay writes.
        stream = torch.cuda.Stream(device=self.k.device)
        stream.wait_stream(torch.cuda.current_stream(self.k.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(n)
        torch.cuda.current_stream(self.k.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            logits = self._step(n)
        return graph, logits
