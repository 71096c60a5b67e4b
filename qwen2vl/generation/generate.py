"""Prefill then decode with a static KV cache; the generator owns the cache and the positions.

Letters: B batch, T prompt tokens, V vocabulary.

Positions: prefill returns each row's ``rope_delta``; the n-th real token of a row (n counted from
0, padding not counted) sits at M-RoPE position n + delta on all three axes, so every decode step
feeds position ``n_real + delta``. Finished rows keep being fed (their tokens are discarded), which
keeps the batch rectangular and the decode step free of per-row Python branches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from qwen2vl.generation.kv_cache import KVCache
from qwen2vl.generation.sampling import SamplingParams, sample
from qwen2vl.model.qwen2vl import Qwen2VL

VISUAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclass
class Step:
    tokens: torch.Tensor  # [B] the token each row produced at this step
    active: torch.Tensor  # [B] bool: rows that produced a real token (not yet finished before)
    finished: torch.Tensor  # [B] bool: rows finished after this step
    logprobs: torch.Tensor | None = None  # [B] log-probability of each token under the model


class Generator:
    """One batch being generated. ``prefill`` runs in the constructor; iterate for steps."""

    def __init__(
        self,
        model: Qwen2VL,
        batch: dict,
        params: SamplingParams,
        *,
        stop_token_ids: list[int],
        pad_token_id: int = 0,
        inputs_embeds: torch.Tensor | None = None,
    ):
        self.model, self.params = model, params
        self.stop_ids = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long)
        self.pad_token_id = pad_token_id
        ids = batch["input_ids"]
        B, T = ids.shape
        device = ids.device
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        dtype = model.lm_head.weight.dtype if inputs_embeds is None else inputs_embeds.dtype
        self.cache = KVCache(
            model.cfg.text, B, T + params.max_new_tokens, dtype=dtype, device=device
        )
        self.mask = torch.ones(B, T + params.max_new_tokens, dtype=torch.long, device=device)
        self.mask[:, :T] = mask
        self.padded = not bool(mask.all())
        self.rng = None
        if params.seed is not None:
            self.rng = torch.Generator(device=device).manual_seed(params.seed)
        self.seen = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(B, model.cfg.text.vocab_size, dtype=torch.bool, device=device)
            self.seen.scatter_(1, ids.masked_fill(mask == 0, 0), mask.bool())
        self.finished = torch.zeros(B, dtype=torch.bool, device=device)
        self.n_new = 0
        with torch.inference_mode():
            out = model(
                ids,
                mask,
                **{k: batch[k] for k in VISUAL_KEYS if batch.get(k) is not None},
                kv_cache=self.cache,
                inputs_embeds=inputs_embeds,
                logits_to_keep=1,
            )
        self.cache.commit(T)
        self.rope_deltas = out.rope_deltas
        self.n_real = mask.sum(1)  # [B]
        self.logits = out.logits[:, -1]

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
        mask = self.mask[:, : L + 1] if self.padded else None
        ids = tokens[:, None]
        with torch.inference_mode():
            # Embedded directly: a generated placeholder token (e.g. <|image_pad|>) is plain text
            # here, not a slot waiting for vision features.
            x = self.model.model.embed_tokens(ids)
            out = self.model(ids, mask, position_ids=pos, kv_cache=self.cache, inputs_embeds=x)
        self.cache.commit(1)
        self.n_real = self.n_real + 1
        self.logits = out.logits[:, -1]


def generate(
    model: Qwen2VL, batch: dict, params: SamplingParams, *, stop_token_ids: list[int]
) -> list[list[int]]:
    """New token ids of every row, each ending at (and including) its stop token if one came."""
    gen = Generator(model, batch, params, stop_token_ids=stop_token_ids)
    rows: list[list[int]] = [[] for _ in range(batch["input_ids"].shape[0])]
    for step in gen:
        for b in step.active.nonzero().flatten().tolist():
            rows[b].append(int(step.tokens[b]))
    return rows
