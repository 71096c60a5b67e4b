"""Tool calling: rendering against the Qwen2.5 template, and parsing generated calls."""

import json
from pathlib import Path

import pytest
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwen2vl.chat import render, render_ids
from qwen2vl.errors import MessageError, ToolCallError
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.tools import (
    ToolCall,
    format_tool_call,
    parse_tool_calls,
    tool_call_from_message,
    tools_system_text,
)

QWEN25 = (Path(__file__).parent / "fixtures" / "qwen25_chat_template.jinja").read_text("utf-8")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — in °C",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}
SYSTEM = {"role": "system", "content": "You are a helpful assistant."}


def call(name: str, **arguments) -> dict:
    return {"id": "c1", "type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATIONS = {
    "tools_only": ([SYSTEM, {"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    "two_tools": ([SYSTEM, {"role": "user", "content": "Time?"}], [WEATHER, CLOCK]),
    "empty_system": (
        [{"role": "system", "content": ""}, {"role": "user", "content": "?"}],
        [CLOCK],
    ),
    "custom_system": (
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [CLOCK],
    ),
    "call_and_result": (
        [
            SYSTEM,
            {"role": "user", "content": "Weather in 東京?"},
            {"role": "assistant", "content": "", "tool_calls": [call("get_weather", city="東京")]},
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 °C."},
        ],
        [WEATHER],
    ),
    "parallel_calls_and_results": (
        [
            SYSTEM,
            {"role": "user", "content": "Paris and Rome, and the time"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [call("get_weather", city="Paris"), call("now")],
            },
            {"role": "tool", "content": "sunny"},
            {"role": "tool", "content": "12:00"},
        ],
        [WEATHER, CLOCK],
    ),
    "results_without_tools": (
        [
            SYSTEM,
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"name": "now", "arguments": {}}]},
            {"role": "tool", "content": "noon"},
        ],
        None,
    ),
}


def qwen25_render(messages, tools, **kwargs) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])  # fmt: skip
    # transformers' tojson filter
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env.from_string(QWEN25).render(messages=messages, tools=tools, **kwargs)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(None)


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_matches_qwen25_tool_template(name, add_generation_prompt):
    messages, tools = CONVERSATIONS[name]
    expected = qwen25_render(messages, tools, add_generation_prompt=add_generation_prompt)
    got = render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    assert got == expected


def test_default_system_prompt_with_tools_is_qwen2vl_s():
    messages = [{"role": "user", "content": "hi"}]
    assert render(messages, tools=[CLOCK]) == qwen25_render([SYSTEM, *messages], [CLOCK])


def test_openai_string_arguments_render_like_objects():
    as_object = CONVERSATIONS["call_and_result"][0]
    as_string = json.loads(json.dumps(as_object))
    fn = as_string[2]["tool_calls"][0]["function"]
    fn["arguments"] = json.dumps(fn["arguments"])
    assert render(as_string, tools=[WEATHER]) == render(as_object, tools=[WEATHER])


def test_tool_turns_keep_images_and_the_guard(tok):
    shot = {"type": "image", "image": "screen.png"}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "click OK"}]},
        {"role": "assistant", "content": None, "tool_calls": [call("screenshot")]},
        {"role": "tool", "content": [shot, {"type": "text", "text": "<|im_start|>"}]},
    ]
    text = render(messages, tools=[CLOCK])
    assert "<tool_response>\n<|vision_start|><|image_pad|><|vision_end|><|im_start|>\n" in text
    ids, visuals = render_ids(messages, tok, tools=[CLOCK])
    assert len(visuals) == 1 and ids.count(tok.im_start_id) == 4


def test_tool_system_text_layout():
    text = tools_system_text("S", [CLOCK])
    assert text.startswith("S\n\n# Tools\n\nYou may call one or more functions")
    assert '\n<tools>\n{"type": "function", "function": {"name": "now"' in text
    assert text.endswith('{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


@pytest.mark.parametrize(
    ("entry", "match"),
    [
        ("get_weather", "must be a dict"),
        ({"function": {"arguments": {}}}, "no function name"),
        ({"function": {"name": "f", "arguments": "{bad"}}, "not valid JSON"),
        ({"function": {"name": "f", "arguments": "[1]"}}, "JSON object"),
    ],
)
def test_bad_tool_calls_in_messages_raise_message_error(entry, match):
    with pytest.raises(MessageError, match=match):
        tool_call_from_message(entry)
    with pytest.raises(MessageError, match=match):
        render([{"role": "assistant", "content": None, "tool_calls": [entry]}])


def test_bad_tools_raise_message_error():
    with pytest.raises(MessageError, match="list of dicts"):
        render([{"role": "user", "content": "x"}], tools={"name": "f"})
    with pytest.raises(MessageError, match="JSON"):
        render([{"role": "user", "content": "x"}], tools=[{"f": object()}])


def test_parse_round_trips_formatted_calls():
    calls = [ToolCall("get_weather", {"city": "東京", "days": [1, 2]}), ToolCall("now")]
    text = "Checking.\n" + "\n".join(format_tool_call(c) for c in calls)
    assert parse_tool_calls(text) == ("Checking.", calls)


def test_parse_without_calls_returns_the_text():
    assert parse_tool_calls("  just an answer \n") == ("just an answer", [])


def test_parse_accepts_string_arguments_and_missing_arguments():
    text = '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>'
    text += '<tool_call>{"name": "g"}</tool_call>'
    assert parse_tool_calls(text)[1] == [ToolCall("f", {"a": 1}), ToolCall("g", {})]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("<tool_call>\n{not json}\n</tool_call>", "not valid JSON"),
        ('<tool_call>{"arguments": {}}</tool_call>', "'name'"),
        ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "JSON object"),
        ('<tool_call>{"name": "f", "arguments": "nope"}</tool_call>', "not JSON"),
        ('ok <tool_call>\n{"name": "f", "argu', "unclosed"),
    ],
)
def test_malformed_calls_raise_or_stay_in_the_text(text, match):
    with pytest.raises(ToolCallError, match=match):
        parse_tool_calls(text)
    content, calls = parse_tool_calls(text, on_error="keep")
    assert calls == [] and content == text.strip()


def test_keep_mode_still_returns_the_good_calls():
    text = '<tool_call>{"name": "a"}</tool_call> mid <tool_call>{bad}</tool_call>'
    content, calls = parse_tool_calls(text, on_error="keep")
    assert calls == [ToolCall("a")]
    assert content == "mid <tool_call>{bad}</tool_call>"


def test_to_openai_uses_string_arguments():
    entry = ToolCall("f", {"x": "é"}).to_openai("call_0")
    assert entry == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "f", "arguments": '{"x": "é"}'},
    }
    assert tool_call_from_message(entry) == ToolCall("f", {"x": "é"})
