"""Engine events turned into OpenAI responses: one JSON body, or server-sent-event chunks.

With tools, text from the first ``<tool_call>`` on is held back while streaming (and a tail that
could be the start of one), then parsed into ``tool_calls`` when the choice ends; text before it
streams as content. A forced tool choice put its opening text into the prompt, so it starts held.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from qwen2vl.serve import protocol
from qwen2vl.serve.sequence import Delta, Event, TokenLogprob
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.tools import TOOL_CALL_START, ToolCall, parse_tool_calls


class Choice:
    """One choice's text as it arrives: content shown now, tool calls held back."""

    def __init__(self, index: int, *, tools_on: bool, prefix: str = "", suffix: str = ""):
        self.index, self.tools_on, self.suffix = index, tools_on, suffix
        self.text = prefix  # everything generated (with the forced prefix)
        self.pending = ""  # a tail that may start "<tool_call>"
        self.held = prefix  # text from the first "<tool_call>" on
        self.logprobs: list[TokenLogprob] = []
        self.tokens = 0

    def push(self, delta: Delta) -> str:
        """Content to show now."""
        self.text += delta.text
        self.tokens += len(delta.tokens)
        self.logprobs += delta.logprobs or []
        if not self.tools_on:
            return delta.text
        if self.held:
            self.held += delta.text
            return ""
        text = self.pending + delta.text
        start = text.find(TOOL_CALL_START)
        if start >= 0:
            self.held, self.pending = text[start:], ""
            return text[:start]
        keep = _partial_suffix(text, TOOL_CALL_START)
        self.pending = text[len(text) - keep :]
        return text[: len(text) - keep]

    def end(self, reason: str) -> None:
        """The choice ended: a constrained tool call that completed gets its closing text."""
        if reason == "stop" and self.suffix:
            self.text += self.suffix
            self.held += self.suffix

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Content not shown yet and the tool calls, at the end of the choice."""
        tail, self.pending = self.pending, ""
        if not self.held:
            return tail, []
        content, calls = parse_tool_calls(self.held, on_error="keep")
        return tail + content, calls

    def message(self, finish_reason: str) -> tuple[dict[str, Any], str]:
        """The non-stream message and finish reason."""
        content, calls = self.text, []
        if self.tools_on:
            content, calls = parse_tool_calls(self.text, on_error="keep")
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["content"] = content or None
            message["tool_calls"] = tool_calls(calls, self.index)
            finish_reason = "tool_calls"
        return message, finish_reason


def coalesce(items: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Merge consecutive deltas of one choice: under load one chunk carries several tokens,
    which spares the server and the client a chunk per token. Order is kept."""
    out: list[tuple[int, Event]] = []
    for i, event in items:
        last = out[-1] if out else None
        if last and last[0] == i and isinstance(last[1], Delta) and isinstance(event, Delta):
            a = last[1]
            logprobs = None if a.logprobs is None else a.logprobs + (event.logprobs or [])
            out[-1] = (i, Delta(a.text + event.text, a.tokens + event.tokens, logprobs))
        else:
            out.append((i, event))
    return out


def tool_calls(calls: list[ToolCall], choice: int) -> list[dict[str, Any]]:
    return [c.to_openai(f"call_{choice}_{i}_{_short_id()}") for i, c in enumerate(calls)]


def _short_id() -> str:
    return protocol.new_id()[-12:]


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def logprobs_block(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict | None:
    return {"content": protocol.logprobs_content(tokenizer, entries)} if entries else None


def sse(body: dict[str, Any] | str) -> str:
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return f"data: {data}\n\n"


def final_chunks(
    choice: Choice, reason: str, head: tuple[str, int, str]
) -> Iterator[dict[str, Any]]:
    """The chunks that close a streamed choice: held-back content, tool calls, finish reason."""
    choice.end(reason)
    tail, calls = choice.finish()
    i = choice.index
    if tail:
        yield protocol.chunk(*head, [_choice_delta(i, {"content": tail})])
    if calls:
        entries = [dict(call, index=k) for k, call in enumerate(tool_calls(calls, i))]
        yield protocol.chunk(*head, [_choice_delta(i, {"tool_calls": entries})])
        reason = "tool_calls"
    yield protocol.chunk(*head, [_choice_delta(i, {}, finish_reason=reason)])


def _choice_delta(
    index: int, delta: dict[str, Any], *, finish_reason: str | None = None, logprobs=None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def content_chunk(
    choice: Choice, content: str, head: tuple[str, int, str], logprobs: dict | None = None
) -> dict[str, Any]:
    return protocol.chunk(
        *head, [_choice_delta(choice.index, {"content": content}, logprobs=logprobs)]
    )  # noqa: E501


def role_chunk(index: int, head: tuple[str, int, str]) -> dict[str, Any]:
    return protocol.chunk(*head, [_choice_delta(index, {"role": "assistant", "content": ""})])
