"""Engine events turned into OpenAI responses: one JSON body, or server-sent-event chunks.

With tools, text from the first ``<tool_call>`` on is held back while streaming (and a tail that
could be the start of one), then parsed into ``tool_calls`` when the choice ends; text before it
streams as content (a forced tool choice's grammar writes the whole block, held like any other).

Grounding as data (an extension field): when an answer holds boxes and the request has an image,
the message (or, streaming, the chunk before the finish reason) carries
``"grounding": {"image": k, "width": W, "height": H, "objects": [{"label", "boxes": [[x1, y1,
x2, y2], ...], "quads": [...]}]}`` in pixels of the request's last image (the k-th, from 0) as
sent, whatever size the model saw and whichever frame its family writes boxes in. The boxes are
read from the generated tokens, so ``skip_special_tokens`` (which strips the markup from
``content``) does not hide them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from qwen2vl.grounding import frame_for, objects_in_pixels, parse_grounding
from qwen2vl.serve import protocol
from qwen2vl.serve.sequence import Delta, Event, Request, TokenLogprob
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.tools import TOOL_CALL_START, ToolCall, parse_tool_calls


@dataclass(frozen=True)
class GroundingTarget:
    """Where a choice's boxes land: the request's last image, and how to read the answer."""

    tokenizer: Tokenizer
    image: int  # index among the request's images
    width: int  # the image as sent
    height: int
    resized: tuple[int, int]  # (width, height) the model saw
    model_type: str

    def data(self, tokens: list[int]) -> dict[str, Any] | None:
        text = self.tokenizer.decode(tokens, skip_special_tokens=False)
        objects = [o for o in parse_grounding(text) if o.boxes or o.quads]
        if not objects:
            return None
        frame = frame_for(self.model_type, self.resized)
        shapes = objects_in_pixels(objects, self.width, self.height, frame)
        return {"image": self.image, "width": self.width, "height": self.height, "objects": shapes}


def grounding_target(
    request: Request, tokenizer: Tokenizer, model_type: str
) -> GroundingTarget | None:
    """The target for a request's answers: its last image (None without images)."""
    images = [v for v in request.visuals if v.kind == "image"]
    if not images:
        return None
    plan = images[-1].plan
    resized = (plan.resized_width, plan.resized_height)
    return GroundingTarget(tokenizer, len(images) - 1, plan.width, plan.height, resized, model_type)


class Choice:
    """One choice's text as it arrives: content shown now, tool calls held back."""

    def __init__(
        self,
        index: int,
        *,
        tools_on: bool,
        grounding: GroundingTarget | None = None,
    ):
        self.index, self.tools_on = index, tools_on
        self.text = ""  # everything generated
        self.pending = ""  # a tail that may start "<tool_call>"
        self.held = ""  # text from the first "<tool_call>" on
        self.logprobs: list[TokenLogprob] = []
        self.ids: list[int] = []  # generated tokens: grounding is read from them
        self.grounding = grounding

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def grounding_data(self) -> dict[str, Any] | None:
        return self.grounding.data(self.ids) if self.grounding else None

    def push(self, delta: Delta) -> str:
        """Content to show now."""
        self.text += delta.text
        self.ids += delta.tokens
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
        grounding = self.grounding_data()
        if grounding:
            message["grounding"] = grounding
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
    tail, calls = choice.finish()
    i = choice.index
    if tail:
        yield protocol.chunk(*head, [_choice_delta(i, {"content": tail})])
    if calls:
        entries = [dict(call, index=k) for k, call in enumerate(tool_calls(calls, i))]
        yield protocol.chunk(*head, [_choice_delta(i, {"tool_calls": entries})])
        reason = "tool_calls"
    grounding = choice.grounding_data()
    if grounding:
        yield protocol.chunk(*head, [_choice_delta(i, {"grounding": grounding})])
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
