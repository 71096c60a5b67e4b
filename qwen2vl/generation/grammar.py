"""Constrained decoding: the tokens a grammar allows next, per sequence, on llguidance.

A grammar is text llguidance compiles (its JSON form, or Lark), built here from a JSON schema,
"any JSON object", a regular expression or a list of tools (Qwen2 `<tool_call>` blocks whose
arguments follow each tool's schema). ``Grammar`` compiles one against a tokenizer (once per
request, off the engine thread); ``Grammar.state()`` gives each sequence its own matcher; each
step ``GrammarState.allowed`` says which tokens may come next and ``advance`` takes the one
picked. When the grammar is complete only the stop tokens are allowed, and ``done`` is true.

Why llguidance over xgrammar (both measured here, 2 shared CPU cores, the real 151,657-token
vocabulary, a 7-property schema replayed over 76 tokens): mask + advance cost the same per token
(mean 0.07 ms each; p99 0.7 ms llguidance, 1.2 ms xgrammar), but compiling a schema took 1.7 ms
against 58 ms, and llguidance bounds the work a hostile grammar can cost, compile and per step
(``_limits``); its wheel pulls no triton. Its tokenizer set-up (0.8 s) is paid once per
tokenizer. Applying the mask to a row of logits costs more than computing it (`qwen2vl bench`).

JSON is written as the Qwen template's `tojson` writes it (", " and ": ", no other whitespace),
so a model cannot pad an answer with blank lines; a schema's "x-guidance" key may override that.

The library is imported on first use: without it only a request that needs a grammar fails.

Letters: V vocabulary (the model's logits; may exceed the tokenizer's), W mask words (32 ids each).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import torch

from qwen2vl.errors import Qwen2VLError
from qwen2vl.tokenizer import Tokenizer

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The Qwen2 tool-call block (qwen2vl/tools.py: format_tool_call), up to the arguments and after.
TOOL_CALL_HEAD = '<tool_call>\n{"name": '
TOOL_CALL_ARGS = ', "arguments": '
TOOL_CALL_TAIL = "}\n</tool_call>"


class GrammarError(Qwen2VLError, ValueError):
    """A schema, regex or tool list that cannot be compiled, or llguidance is missing."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise GrammarError(
            'structured output needs llguidance: pip install "qwen2vl[serve]"',
            code="grammar_unavailable",
        ) from e
    return llguidance


@lru_cache(maxsize=1)
def _limits():
    """llguidance's defaults made explicit (fuel: ~50k/ms to compile, ~14k/ms a step), with
    fewer lexer states (1-2 kB each) so that one request cannot hold gigabytes."""
    return _llguidance().LLParserLimits(
        initial_lexer_fuel=1_000_000,
        step_lexer_fuel=200_000,
        step_max_items=50_000,
        max_lexer_states=50_000,
        max_grammar_size=500_000,
    )


# ---- grammar text ---------------------------------------------------------------------------


def json_schema(schema: dict[str, Any], *, strict: bool = True) -> str:
    """Answers valid under ``schema``. strict: a keyword llguidance cannot enforce is an error;
    otherwise it is ignored (the answer is still JSON, not necessarily valid)."""
    defaults = {**JSON_STYLE, "lenient": not strict}
    try:
        return _llguidance().LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
    except ValueError as e:  # not a JSON object
        raise GrammarError(str(e)) from e


def json_object() -> str:
    """Any JSON object."""
    return json_schema({"type": "object"})


def regex(pattern: str) -> str:
    """Answers matching ``pattern`` in full (Rust regex syntax)."""
    return _llguidance().LLMatcher.grammar_from_regex(pattern)


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict[str, Any] | None  # a JSON schema; None: any object
    strict: bool = True


def tool_calls(tools: Sequence[ToolSpec], *, several: bool) -> str:
    """One `<tool_call>` block (several: one or more, a newline apart) calling one of ``tools``
    with arguments valid under its schema (a Lark grammar with %json rules)."""
    calls, rules = [], []
    for i, tool in enumerate(tools):
        schema = {"type": "object"} if tool.parameters is None else tool.parameters
        own = schema.get("x-guidance")
        style = {**JSON_STYLE, "lenient": not tool.strict, **(own if isinstance(own, dict) else {})}
        head = TOOL_CALL_HEAD + json.dumps(tool.name, ensure_ascii=False) + TOOL_CALL_ARGS
        calls.append(f"{_lark_string(head)} args_{i} {_lark_string(TOOL_CALL_TAIL)}")
        rules.append(f"args_{i}: %json {json.dumps({**schema, 'x-guidance': style})}")
    start = 'start: call ("\\n" call)*' if several else "start: call"
    return "\n".join([start, "call: " + " | ".join(calls), *rules])


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # Lark's "..." takes JSON's escapes


def check(grammar: str) -> None:
    """Raise GrammarError with llguidance's message when ``grammar`` does not compile (no
    tokenizer needed: cheaper than ``Grammar``, used to name the part at fault)."""
    llg = _llguidance()
    error = llg.LLMatcher.validate_grammar(grammar, limits=_limits())
    if error:
        raise GrammarError(_one_line(error))


def _one_line(message: str, limit: int = 300) -> str:
    text = "; ".join(line.strip() for line in message.splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + "..."


# ---- compiled grammar and per-sequence state --------------------------------------------------


@lru_cache(maxsize=4)
def token_info(tokenizer: Tokenizer):
    """llguidance's view of the vocabulary (every token's bytes, the special ids, the stop ids);
    built once per tokenizer (0.8 s for Qwen2's)."""
    llg = _llguidance()
    return llg.LLTokenizer(
        llg.TokenizerWrapper(_Vocabulary(tokenizer)), eos_token=[*tokenizer.stop_ids]
    )


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads from a tokenizer."""

    def __init__(self, tokenizer: Tokenizer):
        n = tokenizer.vocab_size
        self.eos_token_id, self.bos_token_id = tokenizer.eos_id, None
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)]
        self.special_token_ids = [i for i in range(n) if tokenizer.is_special(i)]
        self._encode = tokenizer.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


@cache
def _shifts(device: torch.device | str) -> torch.Tensor:
    return torch.arange(32, dtype=torch.int32, device=device)


class Grammar:
    """A grammar compiled against a tokenizer; ``state()`` starts a sequence on it."""

    def __init__(self, tokenizer: Tokenizer, grammar: str):
        llg = _llguidance()
        self.matcher = llg.LLMatcher(token_info(tokenizer), grammar, log_level=0, limits=_limits())
        if self.matcher.is_error():
            raise GrammarError(_one_line(self.matcher.get_error()))
        self.words = (token_info(tokenizer).vocab_size + 31) // 32

    def state(self) -> GrammarState:
        return GrammarState(self.matcher.deep_copy(), self.words)


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, words: int):
        self.matcher = matcher
        self.words = words  # what llguidance fills; the rest of bits stays 0 (never allowed)
        self.bits = torch.zeros(words, dtype=torch.int32)  # [W]

    @property
    def done(self) -> bool:
        """The grammar is complete: nothing but a stop token may follow."""
        return self.matcher.is_stopped()

    def allowed(self, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[vocab] bool on ``device``: the tokens that keep the text inside the grammar."""
        if self.bits.numel() * 32 < vocab:  # ids past the tokenizer's (embedding padding)
            self.bits = torch.cat([self.bits, self.bits.new_zeros(-(-vocab // 32) - self.words)])
        self.matcher.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.words * 4)
        if self.matcher.is_error():
            raise GrammarError(f"grammar failed: {_one_line(self.matcher.get_error())}")
        bits = self.bits.to(device)
        mask = (bits[:, None] >> _shifts(device)) & 1  # [W, 32], bit j of word w: id 32w+j
        return mask.view(-1).bool()[:vocab]

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} breaks the grammar: {self.matcher.get_error()}")
