"""Prefill then decode with a static KV cache; the generator owns the cache and the positions.

Letters: B batch, T prompt tokens, V vocabulary.

Positions: prefill returns each row's ``rope_delta``; the n-th real token of a row (n counted from
0, padding not counted) sits at M-RoPE position n + delta on all three axes, so every decode step
feeds position ``n_real + delta``. Finished rows keep being fed (their tokens are discarded), which
keeps the batch rectangular and the decode step free of per-row Python branches.

``static`` (default: on CUDA) decodes through ``StaticDecoder``: the same step at fixed shapes
over the same cache, captured once as a CUDA graph (launch-bound small models gain most).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qwen2vl.errors import Qwen2VLError
from qwen2vl.generation.kv_cache import KVCache
from qwen2vl.generation.sampling import SamplingParams, sample
from qwen2vl.generation.static_decode import StaticDecoder
from qwen2vl.model.qwen2vl import Qwen2VL

VISUAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
)


@dataclass
class Step:
    tokens: torch.Tensor  # [B] the token each row produced at this step
    active: torch.Tensor  # [B] bool: rows that produced a real token (not yet finished before)
    finished: torch.Tensor  # [B] bool: rows finished after this step
    logprobs: torch.Tensor | None = None  # [B] log-probability of each token under the model


class Generator:
    """One batch being generated, from the state a prefill left: the cache, the logits of the
    last prompt position, each row's rope delta and real-token count. ``Generator.start`` runs the
    standard prefill; iterate for steps."""

    def __init__(
        self,
        model: Qwen2VL,
        params: SamplingParams,
        *,
        cache: KVCache,
        logits: torch.Tensor,
        rope_deltas: torch.Tensor,
        n_real: torch.Tensor,
        stop_token_ids: list[int],
        attention_mask: torch.Tensor | None = None,
        prompt_ids: torch.Tensor | None = None,
        pad_token_id: int = 0,
        static: bool | None = None,
    ):
        self.model, self.params, self.cache = model, params, cache
        self.logits, self.rope_deltas, self.n_real = logits, rope_deltas, n_real  # [B,V], [B], [B]
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
        self.pad_token_id = pad_token_id
        B, device = logits.shape[0], logits.device
        # Padding mask over the whole cache; None when no row has padding.
        self.mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            self.mask = torch.ones(B, cache.capacity, dtype=torch.long, device=device)
            self.mask[:, : attention_mask.shape[1]] = attention_mask
        self.rng = None
        if params.seed is not None:
            self.rng = torch.Generator(device=device).manual_seed(params.seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, logits.shape[-1], dtype=torch.bool, device=device)
            if prompt_ids is not None:
                real = (
                    torch.ones_like(prompt_ids, dtype=torch.bool)
                    if attention_mask is None
                    else attention_mask.bool()
                )
                self.seen.scatter_(1, prompt_ids.masked_fill(~real, 0), real)
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.n_new = 0
        if static is None:  # not under tensor parallelism: its all_reduce stays out of graphs
            dist = torch.distributed
            static = device.type == "cuda" and not (dist.is_available() and dist.is_initialized())
        self.decoder = StaticDecoder(model, cache) if static else None
        if self.decoder is not None:
            self.decoder.set_valid(self.mask)

    @classmethod
    def start(
        cls,
        model: Qwen2VL,
        batch: dict,
        params: SamplingParams,
        *,
        stop_token_ids: list[int],
        pad_token_id: int = 0,
        static: bool | None = None,
    ) -> Generator:
        """Prefill a processor batch (left-padded rows, media) into a fresh cache."""
        ids = batch["input_ids"]
        B, T = ids.shape
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(ids.device)
        dtype = model.model.embed_tokens.weight.dtype
        cache = KVCache(
            model.cfg.text, B, T + params.max_new_tokens, dtype=dtype, device=ids.device
        )
        visual = {k: batch[k] for k in VISUAL_KEYS if batch.get(k) is not None}
        with torch.inference_mode():
            out = model(ids, mask, **visual, kv_cache=cache, logits_to_keep=1)
        cache.commit(T)
        return cls(
            model,
            params,
            cache=cache,
            logits=out.logits[:, -1],
            rope_deltas=out.rope_deltas,
            n_real=mask.sum(1),
            stop_token_ids=stop_token_ids,
            attention_mask=mask,
            prompt_ids=ids,
            pad_token_id=pad_token_id,
            static=static,
        )

    def __iter__(self) -> Iterator[Step]:
        while not self.done:
            yield self.step()

    @property
    def done(self) -> bool:
        return bool(self.finished.all()) or self.n_new >= self.params.max_new_tokens

    def step(self) -> Step:
        """Pick the next token of every row from the pending logits, then feed it."""
        logits = self.logits.float()
        tokens = sample(logits, self.params, seen=self.seen, generator=self.rng)
        logprobs = None
        if self.params.logprobs:
            logprobs = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
        active = ~self.finished
        tokens = tokens.masked_fill(self.finished, self.pad_token_id)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], active[:, None])
        self.finished = self.finished | torch.isin(tokens, self.stop_ids.to(tokens.device))
        self.n_new += 1
        if not self.done:
            self._feed(tokens)
        return Step(tokens=tokens, active=active, finished=self.finished.clone(), logprobs=logprobs)

    def finish(self, row: int) -> None:
        """Mark a row finished from outside (a stop string, a cancelled request)."""
        self.finished[row] = True

    def _feed(self, tokens: torch.Tensor) -> None:
        B = tokens.shape[0]
        L = self.cache.length
        pos = (self.n_real + self.rope_deltas).view(1, B, 1).expand(3, B, 1)
        mask = None if self.mask is None else self.mask[:, : L + 1]
        ids = tokens[:, None]
        if self.decoder is not None:
            self._feed_static(ids, pos)
            return
        with torch.inference_mode():
            # Embedded directly: a generated placeholder token (e.g. <|image_pad|>) is plain text
            # here, not a slot waiting for vision features.
            x = self.model.model.embed_tokens(ids)
            out = self.model(ids, mask, position_ids=pos, kv_cache=self.cache, inputs_embeds=x)
        self.cache.commit(1)
        self.n_real = self.n_real + 1
        self.logits = out.logits[:, -1]

    def _feed_static(self, ids: torch.Tensor, pos: torch.Tensor) -> None:
        L = self.cache.length
        if L >= self.cache.capacity:  # checked here: out of range inside a graph is a device fault
            raise Qwen2VLError(
                f"KV cache full: {L + 1} tokens needed, capacity {self.cache.capacity}"
            )
        lengths = torch.full((ids.shape[0],), L, dtype=torch.long, device=ids.device)
        self.logits = self.decoder(ids, pos, lengths)
        self.cache.commit(1)
        self.n_real = self.n_real + 1


def generate(
    model: Qwen2VL,
    batch: dict,
    params: SamplingParams,
    *,
    stop_token_ids: list[int],
    static: bool | None = None,
) -> list[list[int]]:
    """New token ids of every row, each ending at (and including) its stop token if one came."""
    gen = Generator.start(model, batch, params, stop_token_ids=stop_token_ids, static=static)
    rows: list[list[int]] = [[] for _ in range(batch["input_ids"].shape[0])]
    for step in gen:
        for b in step.active.nonzero().flatten().tolist():
            rows[b].append(int(step.tokens[b]))
    return rows
