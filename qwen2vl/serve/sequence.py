"""One request inside the engine: what it asks for, what it has produced, and its events.

Letters: V vocabulary.

A ``Request`` is the prompt already encoded by the processor (media decoded, ids expanded) plus
its sampling settings; the engine turns it into a ``Sequence`` that picks its tokens from the
logits the engine hands it (among those its grammar allows, when it has one), decodes them to
text (UTF-8 safe, stop strings held back) and reports ``Delta`` and ``Finish`` events through the
callback given at submission. Callbacks run on the engine thread and must only hand the event
over (e.g. to an asyncio queue).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qwen2vl.generation.grammar import Grammar
from qwen2vl.generation.sampling import SamplingParams, apply_repetition_penalty, top_k_top_p
from qwen2vl.generation.stop import StopStrings
from qwen2vl.processor import VisualEncoding
from qwen2vl.tokenizer import Tokenizer


@dataclass
class Request:
    ids: list[int]  # the prompt, placeholders expanded
    visuals: list[VisualEncoding] = field(default_factory=list)
    visual_keys: list[str] = field(default_factory=list)  # encoder-cache key of each visual
    params: SamplingParams = field(default_factory=SamplingParams)
    top_logprobs: int = 0
    skip_special_tokens: bool = True
    grammar: Grammar | None = None  # compiled; each sequence walks it with its own state
    ignore_eos: bool = False
    timeout_s: float | None = None


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    text: str  # may be "" (held back: a partial character or a possible stop string)
    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled" | "timeout" | "error"
    prompt_tokens: int
    completion_tokens: int
    message: str = ""  # for "timeout" and "error"


Event = Delta | Finish
_ids = itertools.count()


class NonFiniteLogits(Exception):
    """A row's logits or probabilities hold inf/NaN: its sequence cannot pick a token."""


class Sequence:
    """Per-request state. ``cancelled`` may be set from any thread; the rest is the engine's."""

    def __init__(
        self,
        request: Request,
        on_event: Callable[[Event], None],
        *,
        tokenizer: Tokenizer,
        stop_token_ids: list[int],
        vocab_size: int,
    ):
        self.id = next(_ids)
        self.request, self.on_event = request, on_event
        self.params = request.params
        self.stop_ids = frozenset() if request.ignore_eos else frozenset(stop_token_ids)
        now = time.monotonic()
        self.submitted, self.first_token_at = now, None
        self.deadline = None if request.timeout_s is None else now + request.timeout_s
        self.cancelled = False
        self.finished = False
        self.row: int | None = None  # slot row while running
        self.next_pos = 0  # M-RoPE position of the next token fed (n_real + rope delta)
        self.generated = 0
        self.cached_tokens = 0  # prompt tokens reused from the prefix cache
        self.last_token = 0
        self.rng = None
        if self.params.seed is not None:
            self.rng = torch.Generator().manual_seed(self.params.seed)
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(request.ids)] = True
        self.decoder = tokenizer.stream(skip_special_tokens=request.skip_special_tokens)
        self.stops = StopStrings(self.params.stop)
        self.grammar = None if request.grammar is None else request.grammar.state()

    @property
    def prompt_tokens(self) -> int:
        return len(self.request.ids)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    # ---- one token -------------------------------------------------------------------------

    def choose(self, logits: torch.Tensor, greedy_token: int) -> int:
        """The next token from this row's logits [V] (float32, finite: the engine checks the
        batch); greedy_token is their argmax. A grammar masks the tokens it forbids before any
        pick. Raises NonFiniteLogits when the penalty or the temperature made them inf/NaN
        (multinomial on NaN is a device assert on CUDA)."""
        p = self.params
        if self.seen is not None:
            penalty = p.repetition_penalty
            logits = apply_repetition_penalty(logits[None], self.seen[None], penalty)[0]
            _require_finite(logits, "logits")
        if self.grammar is not None:  # after the penalty, whose finiteness check -inf fails
            allowed = self.grammar.allowed(logits.shape[-1], logits.device)  # [V]
            logits = logits.masked_fill(~allowed, float("-inf"))
        if p.temperature > 0:
            probs = top_k_top_p(logits[None] / p.temperature, p.top_k, p.top_p).softmax(-1)[0]
            _require_finite(probs, "probabilities")
            token = int(torch.multinomial(probs, 1, generator=self.rng))
        elif self.seen is not None or self.grammar is not None:  # the logits changed
            token = int(logits.argmax())
        else:
            token = greedy_token
        if self.grammar is not None:
            self.grammar.advance(token)
        if self.seen is not None:
            self.seen[token] = True
        return token

    def emit_token(self, token: int, logprob: TokenLogprob | None) -> str | None:
        """Record a chosen token and report it. Returns the finish reason when it ends the
        sequence ("stop" / "length"), else None (the engine then feeds the token)."""
        self.generated += 1
        self.last_token = token
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        reason = None
        text = ""
        if token in self.stop_ids:
            reason = "stop"
        else:
            text = self.stops.push(self.decoder.push(token))
            if self.stops.stopped or (self.grammar is not None and self.grammar.done):
                reason = "stop"
        if reason is None and self.generated >= self.params.max_new_tokens:
            reason = "length"
        if reason is not None:
            text += self.stops.push(self.decoder.flush()) + self.stops.flush()
        self.on_event(Delta(text, [token], None if logprob is None else [logprob]))
        return reason

    def finish(self, reason: str, message: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        self.on_event(Finish(reason, self.prompt_tokens, self.generated, message))


def _require_finite(values: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteLogits(f"non-finite {what} while sampling")
