"""The user-facing chat API: messages in, text (or a stream of text deltas) out.

    pipe = Pipeline.from_pretrained(path, dtype="bfloat16", quantize=None | "int8" | "int4")
    pipe.chat(messages, max_new_tokens=256, temperature=0.0, ...) -> str
    for delta in pipe.chat(messages, stream=True): ...
    pipe.generate(batch, max_new_tokens=...) -> new token ids per row
    pipe.run_batch(requests, max_tokens=...) -> one answer dict per request (the serving engine)

Two caches make multi-turn chat cheap: vision features keyed by a hash of an item's pixels and
grid (same bytes + same resize settings give the same pixels), and the KV cache of the previous
turn, whose unchanged prefix is kept. A Pipeline serves one conversation at a time (not
thread-safe); the server's engine does concurrent requests.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen2vl.generation.generate import Generator, generate
from qwen2vl.generation.kv_cache import KVCache
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.generation.stop import StopStrings
from qwen2vl.hub import resolve_model
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.processor import Encoding, Processor, VisualEncoding, load_processor, position_inputs


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None
    finish_reason: str = "length"  # "stop" (stop token or string) | "length"
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the previous turn


@dataclass
class _Session:
    ids: list[int]  # tokens whose keys/values sit in the cache, in order
    cache: KVCache
    visuals: dict[int, str]  # first token of each visual item -> its content key


class Pipeline:
    def __init__(
        self,
        model: Qwen2VL,
        processor: Processor,
        *,
        stop_token_ids: Sequence[int] | None = None,
        encoder_cache_items: int = 32,
    ):
        self.model, self.processor = model, processor
        tok = processor.tokenizer
        self.stop_token_ids = sorted(set(stop_token_ids or []) | set(tok.stop_ids))
        self.encoder_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoder_cache_items = encoder_cache_items
        self.session: _Session | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | None = "bfloat16",
        quantize: str | None = None,
        device: str = "cpu",
        progress: Callable[[int, int], None] | None = None,
        processor: Processor | None = None,
        tensor_parallel_size: int = 1,
        **processor_kwargs: Any,
    ) -> Pipeline:
        """The model through ``load_for_inference``; ``processor_kwargs`` go to the processor,
        unless the caller loaded it already (``processor``). ``path`` is a checkpoint directory or
        a repo id ``Org/Name`` (see ``resolve_model``). ``tensor_parallel_size=N``: this rank's
        shard, in each of the N processes torchrun starts (each runs the same calls)."""
        path = resolve_model(path)
        model = load_for_inference(
            path,
            dtype,
            device,
            quantize=quantize,
            progress=progress,
            tensor_parallel_size=tensor_parallel_size,
        )
        return cls(
            model,
            processor or load_processor(path, **processor_kwargs),
            stop_token_ids=_generation_eos(Path(path)),
        )

    # ---- public API ------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        stream: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **sampling: Any,
    ):
        """The assistant's reply as a string, or an iterator of text deltas with stream=True.
        Keywords: max_new_tokens, temperature, top_p, top_k, repetition_penalty, stop, seed."""
        events = self._events(messages, SamplingParams(**sampling), tools, Completion())
        return events if stream else "".join(events)

    def complete(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **sampling: Any,
    ) -> Completion:
        """Like chat, with token ids, logprobs (logprobs=True), finish reason and usage."""
        out = Completion()
        for _ in self._events(messages, SamplingParams(**sampling), tools, out):
            pass
        return out

    def generate(
        self, batch: dict, *, stop_token_ids: Sequence[int] | None = None, **sampling: Any
    ) -> list[list[int]]:
        """New token ids of each row of a processor batch; stop_token_ids=None uses the
        checkpoint's stop tokens, [] never stops early."""
        stops = self.stop_token_ids if stop_token_ids is None else list(stop_token_ids)
        return generate(self.model, batch, SamplingParams(**sampling), stop_token_ids=stops)

    def run_batch(
        self,
        requests: Sequence[Any],
        *,
        max_tokens: int = 256,
        base_dir: str | Path | None = None,
        max_num_seqs: int = 8,
        max_model_len: int | None = None,
        seed: int | None = None,
        **sampling: Any,
    ) -> list[dict[str, Any]]:
        """Answer many requests at once, batched continuously; one answer dict per request, in
        order: {"id", "text", "finish_reason", "usage"}, or {"id", "error": {"code", "message"}}
        for a request that cannot run (the others still do). A request is {"messages": [...],
        "id"?, per-request settings as in an OpenAI chat request} or a bare message list;
        ``sampling`` (temperature=0.0 greedy, top_p, top_k, repetition_penalty) and
        ``max_tokens`` / ``seed`` apply where a request sets none. Relative media paths are
        relative to ``base_dir``. See qwen2vl/run.py (and `qwen2vl run` for files)."""
        from qwen2vl import run  # the serving engine: not imported with the pipeline

        unknown = set(sampling) - {"temperature", "top_p", "top_k", "repetition_penalty"}
        if unknown:
            raise TypeError(f"run_batch() got unexpected keyword arguments {sorted(unknown)}")
        settings = run.Settings(
            max_tokens,
            {"temperature": 0.0, **sampling},
            None if base_dir is None else Path(base_dir),
            seed,
        )
        engine = run.make_engine(
            self.model,
            self.processor,
            stop_token_ids=self.stop_token_ids,
            max_num_seqs=max_num_seqs,
            max_model_len=max_model_len,
        )
        return run.run_batch(engine, requests, settings)

    # ---- one chat turn -----------------------------------------------------------------------

    def _events(self, messages, params: SamplingParams, tools, out: Completion) -> Iterator[str]:
        enc = self.processor.encode(messages, add_generation_prompt=True, tools=tools)
        at = self._visual_keys(enc)
        gen = self._prefill(enc, at, params, out)
        decoder = self.processor.tokenizer.stream(skip_special_tokens=True)
        stops = StopStrings(params.stop)
        out.logprobs = [] if params.logprobs else None
        for step in gen:
            token = int(step.tokens[0])
            out.token_ids.append(token)
            if out.logprobs is not None:
                out.logprobs.append(float(step.logprobs[0]))
            if bool(step.finished[0]):
                out.finish_reason = "stop"
            delta = stops.push(decoder.push(token))
            if stops.stopped:
                out.finish_reason = "stop"
                gen.finish(0)
            if delta:
                out.text += delta
                yield delta
            if stops.stopped:
                break
        tail = stops.push(decoder.flush()) + stops.flush()
        if tail:
            out.text += tail
            yield tail
        fed = gen.cache.length - len(enc.ids)
        self.session = _Session(enc.ids + out.token_ids[:fed], gen.cache, dict(at))

    def _prefill(
        self, enc: Encoding, at: list[tuple[int, str]], params: SamplingParams, out: Completion
    ) -> Generator:
        model, T = self.model, len(enc.ids)
        device = model.model.embed_tokens.weight.device
        ids = torch.tensor([enc.ids], device=device)
        P = self._reusable_prefix(enc, at)
        cache = self._cache_for(T + params.max_new_tokens, P)
        pos, deltas = model.positions(ids, None, **position_inputs(enc.visuals, device))
        feats = self._suffix_features(enc, at, P)
        with torch.inference_mode():
            x = model.embed(ids[:, P:], feats["image"], feats["video"])
            res = model(
                ids[:, P:],
                position_ids=pos[:, :, P:],
                kv_cache=cache,
                inputs_embeds=x,
                logits_to_keep=1,
            )
        cache.commit(T - P)
        out.prompt_tokens, out.cached_tokens = T, P
        return Generator(
            model,
            params,
            cache=cache,
            logits=res.logits[:, -1],
            rope_deltas=deltas,
            n_real=torch.tensor([T], device=device),
            stop_token_ids=self.stop_token_ids,
            prompt_ids=ids,
            pad_token_id=self.processor.pad_token_id,
        )

    def _reusable_prefix(self, enc: Encoding, at: list[tuple[int, str]]) -> int:
        """How many leading tokens' keys/values the previous turn left in the cache."""
        if self.session is None:
            return 0
        ids, old, P = enc.ids, self.session.ids, 0
        limit = min(len(old), len(ids) - 1)  # the last prompt token must run to give logits
        while P < limit and old[P] == ids[P]:
            P += 1
        # Placeholder ids say nothing about the pixels: a different image of the same size
        # matches token for token, so each visual item in the prefix must be the same content.
        for start, key in at:
            if start < P and self.session.visuals.get(start) != key:
                P = start
                break
        pads = (self.processor.tokenizer.image_pad_id, self.processor.tokenizer.video_pad_id)
        while 0 < P < len(ids) and ids[P - 1] in pads and ids[P] == ids[P - 1]:
            P -= 1  # never split a visual item: its features go in whole
        return P

    def _visual_keys(self, enc: Encoding) -> list[tuple[int, str]]:
        """(index of its first placeholder token, content key) of each visual item, in order."""
        out, i = [], 0
        pads = {self.processor.tokenizer.image_pad_id, self.processor.tokenizer.video_pad_id}
        for v in enc.visuals:
            while enc.ids[i] not in pads:
                i += 1
            out.append((i, _content_key(v)))
            i += v.tokens
        return out

    def _cache_for(self, capacity: int, keep: int) -> KVCache:
        old = self.session.cache if self.session else None
        self.session = None
        if old is not None and old.capacity >= capacity:
            old.truncate(keep)
            return old
        dtype = self.model.model.embed_tokens.weight.dtype
        device = self.model.model.embed_tokens.weight.device
        cache = KVCache(self.model.cfg.text, 1, capacity, dtype=dtype, device=device)
        if keep:
            cache.k[:, :, :, :keep] = old.k[:, :, :, :keep]
            cache.v[:, :, :, :keep] = old.v[:, :, :, :keep]
            cache.commit(keep)
        return cache

    def _suffix_features(
        self, enc: Encoding, at: list[tuple[int, str]], P: int
    ) -> dict[str, torch.Tensor | None]:
        """Vision features of the items whose tokens start at or after position P."""
        feats: dict[str, list[torch.Tensor]] = {"image": [], "video": []}
        for v, (start, key) in zip(enc.visuals, at, strict=True):
            if start >= P:
                feats[v.kind].append(self._encode(v, key))
        return {k: torch.cat(f) if f else None for k, f in feats.items()}

    def _encode(self, v: VisualEncoding, key: str) -> torch.Tensor:
        if key in self.encoder_cache:
            self.encoder_cache.move_to_end(key)
            return self.encoder_cache[key]
        with torch.inference_mode():
            pixels = v.pixel_values.to(self.model.model.embed_tokens.weight.device)
            feats = self.model.encode_visual(pixels, torch.tensor([v.grid_thw]))
        self.encoder_cache[key] = feats
        while len(self.encoder_cache) > self.encoder_cache_items:
            self.encoder_cache.popitem(last=False)
        return feats


def _content_key(v: VisualEncoding) -> str:
    """Same pixels and grid (same bytes, same resize settings) give the same features."""
    return hashlib.sha1(v.pixel_values.numpy().tobytes()).hexdigest() + str(v.grid_thw)


def _generation_eos(path: Path) -> list[int]:
    """eos_token_id of a checkpoint's generation_config.json (int or list), if any."""
    try:
        eos = json.loads((path / "generation_config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError):
        return []
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else [int(e) for e in eos]
