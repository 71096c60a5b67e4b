"""Turning next-token logits into tokens: repetition penalty, temperature, top-k, top-p.

Letters: B batch, V vocabulary. All functions are pure and work on float32 logits [B, V].
The order follows transformers' logits processors so seeded sampling is comparable.
"""

from __future__ import annotations

import math
import numbers
import reprlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from qwen2vl.errors import SamplingError

# Dividing float32 logits by a colder temperature overflows them to inf (NaN after softmax);
# sampling that cold already is greedy, so it becomes greedy.
MIN_TEMPERATURE = 1e-5
# The penalty scales a seen token's logit; 100x already decides any realistic choice, and with
# MIN_TEMPERATURE it keeps logits up to 1e31 finite. 1.0 = off.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 100.0
# torch.Generator.manual_seed takes [-2**63, 2**64), a negative seed meaning seed + 2**64: we take
# each stream's one non-negative name, so 2**64 is our error, not a crash when the stream starts.
SEED_LIMIT = 2**64


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None  # None = the checkpoint's; [] = never stop early
    stop: list[str] | None = None  # stop strings (checked on the decoded text; not emitted)
    logprobs: bool = False

    def __post_init__(self) -> None:
        """Raises SamplingError naming the first bad field; a temperature under
        MIN_TEMPERATURE becomes 0 (greedy)."""
        self.max_new_tokens = _integer(
            "max_new_tokens", self.max_new_tokens, lambda v: v >= 1, ">= 1"
        )
        self.temperature = _real("temperature", self.temperature, lambda v: v >= 0, ">= 0")
        if self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0
        self.top_p = _real("top_p", self.top_p, lambda v: 0 < v <= 1, "in (0, 1]")
        self.top_k = _integer("top_k", self.top_k, lambda v: v >= 0, ">= 0 (0 = off)")
        self.repetition_penalty = _real(
            "repetition_penalty",
            self.repetition_penalty,
            lambda v: MIN_REPETITION_PENALTY <= v <= MAX_REPETITION_PENALTY,
            f"in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] (1 = off)",
        )
        if self.seed is not None:
            self.seed = _integer("seed", self.seed, lambda v: 0 <= v < SEED_LIMIT, "in [0, 2**64)")
        if self.stop_token_ids is not None:
            self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids)
        if not isinstance(self.logprobs, bool):
            raise SamplingError(
                f"logprobs must be true or false, got {_show(self.logprobs)}", param="logprobs"
            )
        if isinstance(self.stop, str):
            self.stop = [self.stop]


def _show(value: object) -> str:
    return reprlib.repr(value)  # bounded: the value may come from a client


def _integer(name: str, value: object, ok: Callable[[int], bool], rule: str) -> int:
    # bool is an int subclass, but `top_k: true` is a client mistake, not 1
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingError(f"{name} must be an integer, got {_show(value)}", param=name)
    if not ok(int(value)):
        raise SamplingError(f"{name} must be {rule}, got {_show(value)}", param=name)
    return int(value)


def _real(name: str, value: object, ok: Callable[[float], bool], rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingError(f"{name} must be a number, got {_show(value)}", param=name)
    try:
        number = float(value)
    except OverflowError:  # an int past float range
        number = math.inf
    if not math.isfinite(number):
        raise SamplingError(f"{name} must be finite, got {_show(value)}", param=name)
    if not ok(number):
        raise SamplingError(f"{name} must be {rule}, got {_show(value)}", param=name)
    return number


def _token_ids(name: str, value: object) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise SamplingError(f"{name} must be a list of token ids, got {_show(value)}", param=name)
    return [_integer(name, t, lambda v: v >= 0, "token ids >= 0") for t in value]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float):
    """seen [B, V] bool: tokens already in the sequence get their logit divided (or multiplied,
    when negative) by the penalty, as in the CTRL paper and transformers."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set every logit outside the top-k and outside the top-p nucleus to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = (cum - sorted_logits.softmax(-1)) >= top_p  # mass before this token already >= p
        drop[:, 0] = False
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    *,
    seen: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
