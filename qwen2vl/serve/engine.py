"""The serving engine: a scheduler thread that owns the model and runs continuous batching.

Letters: B batch, T tokens, V vocabulary, L layers, K key/value heads, P prompt tokens.

Each scheduler iteration (``step``) does, in order:
1. drop cancelled or timed-out requests, freeing their slot at once;
2. prefill work worth at most one chunk of ``prefill_chunk`` tokens, one request at a time
   (B=1, into a private cache): encode one image or video (through the encoder cache; counts as
   a whole chunk), or run prompt tokens; a prompt that is done moves its keys/values into a free
   slot of the ``SlotCache`` and joins the batch, and what is left of the budget goes to the
   next waiting request (so a burst of short prompts is admitted in one step);
3. one decode step for every running sequence: each picks a token from its pending logits and
   reports it; finished rows leave; the rest are fed together (B = running rows). A row that
   cannot pick (non-finite logits, a failing pick) ends alone with "error".
So new requests delay the running streams by at most one chunk of prefill per token.

The model and its KV caches sit behind a ``Runner`` (runner.py), which mirrors every call to the
other ranks under tensor parallelism; a prompt whose leading blocks were prefilled before (same
tokens, same media) starts from the runner's prefix cache (prefix_cache.py).

Decode positions follow generation/generate.py: the n-th real token of a sequence sits at
M-RoPE position n + rope_delta; a generated placeholder token is embedded as plain text.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.processor import Processor, position_inputs
from qwen2vl.serve.metrics import Metrics
from qwen2vl.serve.prefix_cache import block_hashes, visual_starts
from qwen2vl.serve.runner import HEARTBEAT_S, Leader, RankLost, Runner
from qwen2vl.serve.sequence import Event, NonFiniteLogits, Request, Sequence, TokenLogprob

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is at its bound; the client should retry later."""


class Unavailable(Exception):
    """The engine cannot run the model any more (a tensor-parallel rank was lost)."""


@dataclass
class EngineConfig:
    max_num_seqs: int = 8  # KV slots: sequences decoded together
    max_model_len: int = 4096  # prompt + generated tokens of one sequence
    max_queue: int = 64  # requests waiting for a slot before new ones are refused
    prefill_chunk: int = 256  # prompt tokens per prefill forward
    encoder_cache_items: int = 64  # vision features kept (LRU)
    kv_slack: int | None = None  # extra slot columns; None = max_model_len // 2 (see slots.py)
    prefix_cache_mb: float = 1024.0  # keys/values of prompt prefixes kept; 0 = no prefix cache

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_model_len", "max_queue", "prefill_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.prefix_cache_mb < float("inf"):
            raise ValueError(f"prefix_cache_mb must be >= 0, got {self.prefix_cache_mb}")

    def runner(self, model: Qwen2VL, leader: Leader | None = None) -> Runner:
        """The model side these settings size (the same on every tensor-parallel rank)."""
        slack = self.max_model_len // 2 if self.kv_slack is None else self.kv_slack
        return Runner(
            model,
            slots=self.max_num_seqs,
            capacity=self.max_model_len + max(slack, 1),
            prefix_cache_bytes=int(self.prefix_cache_mb * 2**20),
            leader=leader,
        )


def visual_key(pixel_values: torch.Tensor, grid_thw: tuple[int, int, int]) -> str:
    """Encoder-cache key: the pixels follow from the media bytes and the resize settings."""
    return hashlib.sha1(pixel_values.numpy().tobytes()).hexdigest() + str(tuple(grid_thw))


class _Prefill:
    """The request being admitted: its visual features, then its prompt chunk by chunk."""

    def __init__(self, seq: Sequence):
        self.seq = seq
        self.feats: list[torch.Tensor] = []
        self.keys: list[str] = []  # each visual item's content key (encoder and prefix caches)
        self.started = False  # the runner holds its positions, embeddings and cache
        self.delta = 0  # rope delta
        self.done = 0  # prompt tokens prefilled (or reused from the prefix cache)
        self.logits: torch.Tensor | None = None  # [V] after the last chunk

    @property
    def complete(self) -> bool:
        return self.done == len(self.seq.request.ids)


class Engine:
    def __init__(
        self,
        model: Qwen2VL,
        processor: Processor,
        config: EngineConfig | None = None,
        *,
        stop_token_ids: list[int] | None = None,
        metrics: Metrics | None = None,
        runner: Runner | None = None,
    ):
        """``runner``: the model side, when it is not ``config.runner(model)`` (a leader's)."""
        self.model, self.processor = model, processor
        self.config = config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        tok = processor.tokenizer
        self.stop_token_ids = sorted(set(stop_token_ids or []) | set(tok.stop_ids))
        self.pad_ids = {tok.image_pad_id, tok.video_pad_id}
        self.runner = runner or config.runner(model)
        self.vocab = model.cfg.text.vocab_size
        device = model.model.embed_tokens.weight.device
        self.next_logits = torch.zeros(config.max_num_seqs, self.vocab, device=device)
        self.rows: list[Sequence] = []  # rows[i] runs in slot row i
        self.prefill: _Prefill | None = None
        self.waiting: deque[Sequence] = deque()
        self.encoder_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.lost: str | None = None  # why the model cannot run any more
        self.on_lost: Callable[[], None] | None = None  # called once, on the engine thread

    @property
    def cache(self):
        """The running sequences' KV slots (SlotCache)."""
        return self.runner.cache

    # ---- the thread-safe surface -------------------------------------------------------------

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Sequence:
        """Queue a request; events arrive through on_event (called on the engine thread)."""
        if self.lost:
            raise Unavailable(self.lost)
        need = len(request.ids) + request.params.max_new_tokens
        if need > self.config.max_model_len:
            raise ValueError(
                f"prompt ({len(request.ids)} tokens) + max_tokens "
                f"({request.params.max_new_tokens}) exceeds the model length "
                f"{self.config.max_model_len}"
            )
        seq = Sequence(
            request,
            on_event,
            tokenizer=self.processor.tokenizer,
            stop_token_ids=self.stop_token_ids,
            vocab_size=self.vocab,
        )
        with self.cond:
            if len(self.waiting) >= self.config.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are already waiting")
            self.waiting.append(seq)
            self.cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence (client gone); its slot is freed at the next scheduler step."""
        seq.cancelled = True
        with self.cond:
            self.cond.notify()

    def stats(self) -> dict[str, int]:
        running = len(self.rows) + (self.prefill is not None)
        return {
            "waiting": len(self.waiting),
            "running": running,
            "free_slots": self.config.max_num_seqs - len(self.rows),
            "encoder_cache_items": len(self.encoder_cache),
        }

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="qwen2vl-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self.cond:
            self._stopping = True
            self.cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for seq in [*self.rows, *self.waiting] + ([self.prefill.seq] if self.prefill else []):
            seq.finish("cancelled", "server shutting down")
        if self.runner.leader is not None and not self.lost:
            self.runner.leader.stop()

    def _loop(self) -> None:
        heartbeat = HEARTBEAT_S if self.runner.leader is not None else None
        while True:
            with self.cond:
                idle = False
                while not (self._stopping or self.waiting or self.rows or self.prefill):
                    if not self.cond.wait(heartbeat):
                        idle = True
                        break
                if self._stopping:
                    return
            try:
                self.runner.ping() if idle else self.step()
            except RankLost as e:
                logger.error("%s (%s); the server stops", e, e.__cause__)
                self._lose(f"{e}; the server is stopping")
                return
            except Exception:  # never let one bad step kill the server
                logger.exception("engine step failed; failing the sequences in flight")
                self._fail_all("internal error in the engine")

    def _lose(self, message: str) -> None:
        """The model is gone: every request in flight or waiting ends with a 503."""
        self.lost = message
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        gone = [*self.rows, *waiting] + ([self.prefill.seq] if self.prefill else [])
        self.rows, self.prefill = [], None
        for seq in gone:
            self._end(seq, "cancelled", message)
        if self.on_lost is not None:
            self.on_lost()

    # ---- one scheduler iteration -------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler iteration (the engine thread calls it; tests may call it directly)."""
        now = time.monotonic()
        self._drop_waiting(now)
        self._drop_running(now)
        self._prefill_unit()
        if self.rows:
            self._decode()

    def _drop_waiting(self, now: float) -> None:
        with self.cond:
            gone = [s for s in self.waiting if s.cancelled or s.expired(now)]
            for seq in gone:
                self.waiting.remove(seq)
        for seq in gone:
            self._end(seq, *_why_dropped(seq))

    def _drop_running(self, now: float) -> None:
        for seq in [s for s in self.rows if s.cancelled or s.expired(now)]:
            self._release(seq)
            self._end(seq, *_why_dropped(seq))
        p = self.prefill
        if p is not None and (p.seq.cancelled or p.seq.expired(now)):
            self._drop_prefill()
            self._end(p.seq, *_why_dropped(p.seq))

    def _drop_prefill(self) -> None:
        if self.prefill.started:
            self.runner.drop_prompt()
        self.prefill = None

    def _end(self, seq: Sequence, reason: str, message: str = "") -> None:
        seq.finish(reason, message)
        self.metrics.finished(reason)

    def _fail_all(self, message: str) -> None:
        for seq in list(self.rows):
            self._release(seq)
            self._end(seq, "error", message)
        if self.prefill is not None:
            seq = self.prefill.seq
            self._drop_prefill()
            self._end(seq, "error", message)

    # ---- prefill -----------------------------------------------------------------------------

    def _prefill_unit(self) -> None:
        """Prefill work worth at most one chunk of tokens (a visual item counts as a whole
        chunk): one long prompt advances a chunk, or several short ones are admitted."""
        budget = self.config.prefill_chunk
        while budget > 0:
            if self.prefill is None:
                with self.cond:
                    if not self.waiting or len(self.rows) >= self.config.max_num_seqs:
                        return
                    self.prefill = _Prefill(self.waiting.popleft())
            p = self.prefill
            try:
                budget -= self._advance(p, budget)
            except RankLost:
                raise
            except Exception as e:  # a bad request must not take the others down
                logger.exception("prefill failed for request %d", p.seq.id)
                self._drop_prefill()
                self._end(p.seq, "error", f"prefill failed: {e}")
                return
            if p.complete:
                self.prefill = None
                self._admit(p)

    def _advance(self, p: _Prefill, budget: int) -> int:
        """Encode the next visual item, or prefill up to ``budget`` more prompt tokens; returns
        the budget used."""
        req = p.seq.request
        if len(p.feats) < len(req.visuals):
            i = len(p.feats)
            v = req.visuals[i]
            key = req.visual_keys[i] if i < len(req.visual_keys) else None
            p.keys.append(key or visual_key(v.pixel_values, v.grid_thw))
            p.feats.append(self._encode(v, p.keys[-1]))
            return self.config.prefill_chunk
        if not p.started:
            self._start_prompt(p)
        a, b = p.done, min(p.done + budget, len(req.ids))
        p.logits = self.runner.prefill(a, b)
        p.done = b
        self.metrics.prompt_tokens(b - a)
        return b - a

    def _start_prompt(self, p: _Prefill) -> None:
        """Hand the prompt and its visual features to the runner, which reuses what it can
        of its prefix cache."""
        req = p.seq.request
        feats = {}
        for kind in ("image", "video"):
            mine = [f for f, v in zip(p.feats, req.visuals, strict=True) if v.kind == kind]
            feats[kind] = torch.cat(mine) if mine else None
        hashes = []
        if self.runner.prefix is not None:
            starts = visual_starts(req.ids, self.pad_ids)
            if len(starts) == len(p.keys):  # else the model refuses the prompt: nothing to keep
                hashes = block_hashes(req.ids, list(zip(starts, p.keys, strict=True)))
        p.delta, reused = self.runner.start_prompt(
            req.ids, feats["image"], feats["video"], position_inputs(req.visuals), hashes
        )
        p.started, p.done = True, reused
        p.seq.cached_tokens = reused
        if self.runner.prefix is not None:
            self.metrics.prefix_cache(len(req.ids), reused)

    def _encode(self, visual, key: str) -> torch.Tensor:
        if key in self.encoder_cache:
            self.encoder_cache.move_to_end(key)
            self.metrics.encoder_cache(hit=True)
            return self.encoder_cache[key]
        feats = self.runner.encode(visual.pixel_values, visual.grid_thw)
        self.encoder_cache[key] = feats
        while len(self.encoder_cache) > self.config.encoder_cache_items:
            self.encoder_cache.popitem(last=False)
        self.metrics.encoder_cache(hit=False)
        return feats

    def _admit(self, p: _Prefill) -> None:
        seq, P = p.seq, p.done
        row = self.runner.admit()
        seq.row = row
        seq.next_pos = P + p.delta
        self.next_logits[row] = p.logits
        self.rows.append(seq)
        assert len(self.rows) == self.cache.n and self.rows[row] is seq

    def _release(self, seq: Sequence) -> None:
        row = seq.row
        moved = self.runner.release(row)
        if moved is not None:
            self.rows[row] = self.rows[moved]
            self.rows[row].row = row
            self.next_logits[row] = self.next_logits[moved]
        self.rows.pop()
        seq.row = None

    # ---- decode ------------------------------------------------------------------------------

    def _decode(self) -> None:
        n = len(self.rows)
        logits = self.next_logits[:n]  # [n, V]
        greedy = logits.argmax(-1).tolist()
        finite = torch.isfinite(logits).all(-1).tolist()  # per row: one bad row ends alone
        logp = logits.log_softmax(-1) if any(s.params.logprobs for s in self.rows) else None
        ended, failed = [], []
        for row, seq in enumerate(self.rows):
            try:
                if not finite[row]:
                    raise NonFiniteLogits("non-finite logits while sampling")
                reason = self._next_token(seq, logits, greedy, logp)
            except Exception as e:  # a bad sequence must not take the others down
                failed.append((seq, _why_failed(seq, e)))
                continue
            if reason is not None:
                ended.append((seq, reason))
        self.metrics.generated(n - len(failed))
        for seq, message in failed:
            self.runner.scrub(seq.row)
            self._release(seq)
            self._end(seq, "error", message)
        for seq, reason in ended:
            self._release(seq)
            self._end(seq, reason)
        if self.rows:
            self._feed()

    def _next_token(
        self, seq: Sequence, logits: torch.Tensor, greedy: list[int], logp: torch.Tensor | None
    ) -> str | None:
        """Pick and report ``seq``'s next token from its row of the batch's logits [n, V],
        argmaxes and log-probabilities; returns its finish reason, if any."""
        token = seq.choose(logits[seq.row], greedy[seq.row])
        lp = None
        if seq.params.logprobs:
            lp = _token_logprob(logp[seq.row], token, seq.request.top_logprobs)
        reason = seq.emit_token(token, lp)
        if seq.generated == 1:
            self.metrics.first_token(seq.first_token_at - seq.submitted)
        return reason

    def _feed(self) -> None:
        n = len(self.rows)
        tokens = [s.last_token for s in self.rows]
        self.next_logits[:n] = self.runner.decode(tokens, [s.next_pos for s in self.rows])
        for seq in self.rows:
            seq.next_pos += 1


def _token_logprob(logp: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """logp [V]: the model's log-probabilities (before penalties and temperature)."""
    out = TokenLogprob(token, float(logp[token]))
    if top:
        values, ids = logp.topk(top)
        out.top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return out


def _why_failed(seq: Sequence, error: Exception) -> str:
    """The client's message; the log keeps the traceback of anything but bad numbers."""
    if isinstance(error, NonFiniteLogits):
        logger.warning("request %d: %s", seq.id, error)
        return str(error)
    logger.exception("sampling failed for request %d", seq.id)
    return f"sampling failed: {error}"


def _why_dropped(seq: Sequence) -> tuple[str, str]:
    if seq.cancelled:
        return "cancelled", "the request was cancelled"
    timeout = seq.request.timeout_s
    return "timeout", f"the request did not finish within its timeout of {timeout} s"
