"""Function calling in the Qwen2 / Qwen2.5 text format (Qwen2-VL's own template has none).

Tools go into the system prompt as one JSON schema per line inside <tools></tools>; the model
answers with `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks; results come
back in a user turn as `<tool_response>\\n...\\n</tool_response>`. The texts below are the Qwen2.5
chat template's (tests/fixtures/qwen25_chat_template.jinja), byte for byte. JSON is written as
transformers' `tojson` filter writes it: `json.dumps(x, ensure_ascii=False)`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from qwen2vl.errors import MessageError, ToolCallError

TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
TOOL_RESPONSE_START = "<tool_response>\n"
TOOL_RESPONSE_END = "\n</tool_response>"

_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One function call: the function's name and its JSON-object arguments."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)

    def arguments_json(self) -> str:
        return to_json(self.arguments)

    def to_openai(self, call_id: str) -> dict[str, Any]:
        """The OpenAI `tool_calls` entry (arguments as a JSON string, as OpenAI sends them)."""
        function = {"name": self.name, "arguments": self.arguments_json()}
        return {"id": call_id, "type": "function", "function": function}


def to_json(value: Any) -> str:
    """JSON the way the official templates' `tojson` filter writes it (non-ASCII kept)."""
    return json.dumps(value, ensure_ascii=False)


def tools_system_text(system: str, tools: Sequence[Mapping[str, Any]]) -> str:
    """The system prompt text with the tool signatures appended (no <|im_start|>/<|im_end|>)."""
    return system + TOOLS_HEADER + "".join("\n" + to_json(t) for t in tools) + TOOLS_FOOTER


def format_tool_call(call: ToolCall) -> str:
    """`<tool_call>` block as the model writes it (name is not JSON-escaped, as in the template)."""
    body = '{"name": "' + call.name + '", "arguments": ' + call.arguments_json() + "}"
    return f"{TOOL_CALL_START}\n{body}\n{TOOL_CALL_END}"


def format_tool_response(content: str) -> str:
    """One tool result; consecutive results share a user turn (see chat.py)."""
    return TOOL_RESPONSE_START + content + TOOL_RESPONSE_END


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools must be a list of JSON-schema dicts (OpenAI style: {"type": "function", ...})."""
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, Mapping) for t in tools):
        raise MessageError(f"tools must be a list of dicts, got {tools!r:.200}")
    try:
        return [json.loads(to_json(t)) for t in tools]
    except (TypeError, ValueError) as e:
        raise MessageError(f"tools must be JSON-serialisable: {e}") from e


def tool_call_from_message(entry: Any) -> ToolCall:
    """An assistant message's `tool_calls` entry: OpenAI style or bare {"name", "arguments"}.

    OpenAI sends arguments as a JSON string; the Qwen template wants the object, so we parse it
    (vLLM does the same before rendering).
    """
    if not isinstance(entry, Mapping):
        raise MessageError(f"a tool_calls entry must be a dict, got {entry!r:.200}")
    function = entry.get("function", entry)
    name, arguments = function.get("name"), function.get("arguments", {})
    if not isinstance(name, str) or not name:
        raise MessageError(f"tool call has no function name: {entry!r:.200}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as e:
            raise MessageError(f"tool call {name!r}: arguments are not valid JSON: {e}") from e
    if not isinstance(arguments, Mapping):
        raise MessageError(f"tool call {name!r}: arguments must be a JSON object")
    return ToolCall(name=name, arguments=dict(arguments))


def parse_tool_calls(
    text: str, *, on_error: Literal["raise", "keep"] = "raise"
) -> tuple[str, list[ToolCall]]:
    """Split generated text into (content without the <tool_call> blocks, the calls in order).

    A malformed block (bad JSON, no name, arguments not an object, or a `<tool_call>` never
    closed, e.g. a generation cut by max_tokens) raises ToolCallError with `on_error="raise"`;
    with `on_error="keep"` it stays in the content text verbatim so the caller can show it.
    The content is stripped of surrounding whitespace.
    """
    calls: list[ToolCall] = []
    kept: list[str] = []
    pos = 0
    for match in _TOOL_CALL_BLOCK.finditer(text):
        kept.append(text[pos : match.start()])
        pos = match.end()
        try:
            calls.append(_parse_block(match.group(1)))
        except ToolCallError:
            if on_error == "raise":
                raise
            kept.append(match.group(0))
    tail = text[pos:]
    if TOOL_CALL_START in tail and on_error == "raise":
        raise ToolCallError(f"unclosed <tool_call> in generated text: {tail!r:.200}")
    kept.append(tail)
    return "".join(kept).strip(), calls


def _parse_block(body: str) -> ToolCall:
    try:
        obj = json.loads(body)
    except ValueError as e:
        raise ToolCallError(f"tool call is not valid JSON ({e}): {body.strip()!r:.200}") from e
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        raise ToolCallError(f"tool call needs a string 'name': {body.strip()!r:.200}")
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # some fine-tunes emit the OpenAI string form
        try:
            arguments = json.loads(arguments)
        except ValueError as e:
            raise ToolCallError(f"tool call {obj['name']!r}: arguments string is not JSON") from e
    if not isinstance(arguments, dict):
        raise ToolCallError(f"tool call {obj['name']!r}: arguments must be a JSON object")
    return ToolCall(name=obj["name"], arguments=arguments)
