"""Grammar states over the real Qwen2 vocabulary: a valid answer's tokens are all allowed, the
complete answer allows only the stop tokens, a token outside the grammar is refused, and each
sequence walks its own state."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from qwen2vl.generation import grammar
from qwen2vl.generation.grammar import Grammar, GrammarError, ToolSpec
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.tools import ToolCall, format_tool_call, parse_tool_calls

V = 151936  # the model's logits: the tokenizer's 151,657 ids padded

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_dir(None)


def walk(tok, compiled: Grammar, text: str):
    """Advance a fresh state over text's tokens, checking each was allowed."""
    state = compiled.state()
    for token in tok.encode(text):
        assert state.allowed(V)[token], (text, tok.decode([token]))
        state.advance(token)
    return state


def allowed_ids(state) -> set[int]:
    return set(torch.nonzero(state.allowed(V)).view(-1).tolist())


def test_a_valid_answer_is_allowed_and_its_end_allows_only_the_stop_tokens(tok):
    compiled = Grammar(tok, grammar.json_schema(SCHEMA))
    state = walk(tok, compiled, json.dumps({"name": "Ada Lovelace", "age": 36, "tags": ["b"]}))
    assert state.done and allowed_ids(state) == set(tok.stop_ids)
    unfinished = walk(tok, compiled, '{"name": "Ada", "age": 3')
    assert not unfinished.done and tok.encode("}")[0] in allowed_ids(unfinished)


def test_a_token_outside_the_grammar_is_masked_and_refused(tok):
    state = Grammar(tok, grammar.json_schema(SCHEMA)).state()
    bad = tok.encode("x")[0]
    assert not state.allowed(V)[bad]  # an answer must open with "{"
    with pytest.raises(GrammarError, match="breaks the grammar"):
        state.advance(bad)


def test_the_mask_covers_the_model_vocabulary_and_padding_is_never_allowed(tok):
    state = Grammar(tok, grammar.json_object()).state()
    mask = state.allowed(V)
    assert mask.shape == (V,) and mask.dtype == torch.bool
    assert not mask[tok.vocab_size :].any()
    assert not mask[tok.im_start_id] and mask[tok.encode("{")[0]]


def test_json_is_written_as_the_template_writes_it(tok):
    # ", " and ": " only: no blank lines or indentation a model could pad an answer with.
    compiled = Grammar(tok, grammar.json_object())
    walk(tok, compiled, '{"a": [1, 2], "b": {"c": null}}')
    state = walk(tok, compiled, '{"a":')
    assert tok.encode(" ")[0] in allowed_ids(state)
    state.advance(tok.encode(" ")[0])
    assert not (allowed_ids(state) & {tok.encode(" ")[0], tok.encode("\n")[0]})


def test_each_sequence_walks_its_own_state(tok):
    compiled = Grammar(tok, grammar.json_schema(SCHEMA))
    a, b = compiled.state(), compiled.state()
    for token in tok.encode('{"name": "x", "age": 1}'):
        a.advance(token)
    assert a.done and not b.done
    assert allowed_ids(b) == allowed_ids(compiled.state())


def test_tool_calls_follow_the_qwen_format_and_each_tools_schema(tok):
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    specs = [ToolSpec("get_weather", weather), ToolSpec("now", None)]
    one = Grammar(tok, grammar.tool_calls(specs, several=False))
    text = format_tool_call(ToolCall("get_weather", {"city": "Paris"}))
    assert walk(tok, one, text).done
    several = Grammar(tok, grammar.tool_calls(specs, several=True))
    text += "\n" + format_tool_call(ToolCall("now", {}))
    state = walk(tok, several, text)
    assert not state.done and set(tok.stop_ids) <= allowed_ids(state)  # another call, or stop
    assert [c.name for c in parse_tool_calls(text)[1]] == ["get_weather", "now"]
    # "city" is required (the only key); only the listed names may be called.
    keys = walk(tok, one, '<tool_call>\n{"name": "get_weather", "arguments": {"')
    assert {tok.decode([t]) for t in allowed_ids(keys)} <= {"c", "ci", "cit", "city", 'city"'}
    names = walk(tok, several, '<tool_call>\n{"name": "')
    assert all(
        "get_weather".startswith(t) or "now".startswith(t) or t in ('get_weather"', 'now"')
        for t in (tok.decode([t]) for t in allowed_ids(names))
    )


def test_a_regex_is_matched_in_full(tok):
    compiled = Grammar(tok, grammar.regex(r"[0-9]{3}-(yes|no)"))
    assert walk(tok, compiled, "123-no").done
    assert tok.encode("1")[0] not in allowed_ids(walk(tok, compiled, "123"))


@pytest.mark.parametrize(
    "schema, strict, message",
    [
        ({"type": "integr"}, False, "Invalid type"),
        ({"$ref": "#/$defs/missing"}, False, "does not exist"),
        ({"type": "string", "pattern": "(("}, False, "unclosed group"),
        ({"type": "object", "dependentSchemas": {"a": {}}}, True, "Unimplemented keys"),
    ],
)
def test_a_schema_that_cannot_be_enforced_is_refused(tok, schema, strict, message):
    with pytest.raises(GrammarError, match=message):
        Grammar(tok, grammar.json_schema(schema, strict=strict))


def test_without_strict_a_keyword_it_cannot_enforce_is_ignored(tok):
    schema = {"type": "object", "dependentSchemas": {"a": {}}}
    assert walk(tok, Grammar(tok, grammar.json_schema(schema, strict=False)), "{}").done


def test_a_bad_regex_and_a_bad_tool_schema_are_refused(tok):
    with pytest.raises(GrammarError, match="unclosed group"):
        Grammar(tok, grammar.regex("(("))
    with pytest.raises(GrammarError, match="Invalid type"):
        grammar.check(grammar.tool_calls([ToolSpec("f", {"type": "nope"})], several=False))


def test_without_llguidance_a_grammar_fails_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # any import of it now fails
    with pytest.raises(GrammarError, match=r"pip install \"qwen2vl\[serve\]\""):
        grammar.json_object()
