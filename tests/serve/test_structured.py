"""Structured output through the official `openai` client against a real server: JSON-schema
answers validate (jsonschema) for every request of a concurrent batch, streamed or not;
json_object answers parse; forced tool calls' arguments validate against each tool's schema; a
regex is matched in full; a schema that cannot compile is a 400 naming it, before any media is
read or any slot taken; and a constrained row leaves the rows beside it unchanged.

The tiny model is random: schemas here bound every string and number and close every object, so
that each answer ends well within max_tokens (an unbounded one may not, and then ends with
"length", as any answer does).
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from qwen2vl.generation import grammar
from qwen2vl.generation.grammar import Grammar
from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.serve.engine import Engine, EngineConfig
from qwen2vl.serve.sequence import Delta, Finish, Request

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
BOX = {
    "type": "object",
    "properties": {
        "label": {"enum": ["car", "tree"]},
        "box": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 999},
            "minItems": 4,
            "maxItems": 4,
        },
        "visible": {"type": "boolean"},
    },
    "required": ["label", "box", "visible"],
    "additionalProperties": False,
}
ITEMS = {
    "type": "array",
    "items": {"type": "string", "pattern": "^[a-z]{1,5}$"},
    "minItems": 1,
    "maxItems": 3,
}
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "maximum": 99, "minimum": -99},
        "b": {"type": "integer", "maximum": 99, "minimum": -99},
    },
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD, "strict": True}},
]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def schema_format(schema: dict, name: str = "answer", strict: bool = True) -> dict:
    return {
        "type": "json_schema",
        "json_schema": {"name": name, "schema": schema, "strict": strict},
    }


def ask(client, model, text: str, *, stream: bool = False, **kw) -> tuple[str, str]:
    """(content, finish_reason) of one choice, streamed or not."""
    messages = [{"role": "user", "content": text}]
    kw.setdefault("max_tokens", 60)
    if not stream:
        out = client.chat.completions.create(model=model, messages=messages, **kw)
        return out.choices[0].message.content, out.choices[0].finish_reason
    chunks = [
        c.choices[0]
        for c in client.chat.completions.create(model=model, messages=messages, stream=True, **kw)
        if c.choices
    ]
    return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason


def test_json_schema_answers_validate_for_every_request_of_a_concurrent_batch(client, model):
    jobs = [
        (schema, stream, sampling)
        for schema in (PERSON, BOX, ITEMS)
        for stream in (False, True)
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 7})
    ]

    def run(job):
        schema, stream, sampling = job
        fmt = schema_format(schema)
        return ask(client, model, "Describe it.", stream=stream, response_format=fmt, **sampling)

    with ThreadPoolExecutor(len(jobs)) as pool:  # 12 requests over the server's 4 slots
        answers = list(pool.map(run, jobs))
    for (schema, stream, sampling), (content, reason) in zip(jobs, answers, strict=True):
        assert reason == "stop", (schema, stream, sampling, content)
        jsonschema.validate(json.loads(content), schema)
    # Streamed and not, the same greedy answer.
    greedy = {
        (json.dumps(schema), stream): answer
        for (schema, stream, sampling), answer in zip(jobs, answers, strict=True)
        if "seed" not in sampling
    }
    for schema in (PERSON, BOX, ITEMS):
        assert greedy[json.dumps(schema), False] == greedy[json.dumps(schema), True]


def test_each_of_n_choices_walks_its_own_grammar_state(client, model):
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Describe it."}], n=3,
        response_format=schema_format(PERSON), max_tokens=60, temperature=1.0, seed=11,
    )  # fmt: skip
    answers = [json.loads(c.message.content) for c in out.choices]
    for answer in answers:
        jsonschema.validate(answer, PERSON)
    assert len({json.dumps(a) for a in answers}) > 1


def test_json_object_answers_parse_or_end_at_length(client, model):
    answers = [
        ask(client, model, "Reply in JSON.", response_format={"type": "json_object"},
            max_tokens=30, temperature=1.0, seed=seed)
        for seed in range(4)
    ]  # fmt: skip
    for content, reason in answers:
        assert content.startswith("{") and "\n" not in content
        if reason == "stop":
            assert isinstance(json.loads(content), dict)
        else:
            assert reason == "length"
    assert any(reason == "stop" for _, reason in answers)  # a random model closes some at once


def test_an_answer_the_budget_cannot_finish_ends_with_length(client, model):
    content, reason = ask(
        client, model, "Describe it.", response_format=schema_format(PERSON), max_tokens=3,
        temperature=0,
    )  # fmt: skip
    assert reason == "length" and content.startswith('{"name')


def check_calls(calls, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.function.name in names and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_calls_hold_each_tools_arguments_to_its_schema(client, model, stream):
    messages = [{"role": "user", "content": "What is 2 + 3, and the weather in Paris?"}]
    kw = dict(model=model, messages=messages, tools=TOOLS, max_tokens=120, temperature=0)
    choices = [
        ("required", {"get_weather", "add"}, {"parallel_tool_calls": False}),
        ({"type": "function", "function": {"name": "add"}}, {"add"}, {}),
        ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}, {}),
    ]
    for choice, names, extra in choices:
        if not stream:
            out = client.chat.completions.create(tool_choice=choice, **extra, **kw).choices[0]
            assert out.finish_reason == "tool_calls" and not out.message.content
            assert len(out.message.tool_calls) == 1
            check_calls(out.message.tool_calls, names)
            continue
        stream_ = client.chat.completions.create(tool_choice=choice, stream=True, **extra, **kw)
        chunks = [c.choices[0] for c in stream_ if c.choices]
        assert not "".join(c.delta.content or "" for c in chunks)
        assert chunks[-1].finish_reason == "tool_calls"
        check_calls([t for c in chunks for t in c.delta.tool_calls or []], names)


def test_required_with_parallel_calls_makes_one_or_more_valid_calls(client, model):
    # A random model rarely stops between calls: the answer may end (length) inside one.
    out = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Go."}], tools=TOOLS,
        tool_choice="required", max_tokens=120, temperature=0,
    ).choices[0]  # fmt: skip
    check_calls(out.message.tool_calls, {"get_weather", "add"})
    assert not out.message.content or out.message.content.startswith("<tool_call>")


def test_required_without_parallel_calls_makes_exactly_one(client, model):
    for seed in range(3):
        out = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Go."}], tools=TOOLS,
            tool_choice="required", parallel_tool_calls=False, max_tokens=120, temperature=1.0,
            seed=seed,
        )  # fmt: skip
        assert len(out.choices[0].message.tool_calls) == 1


def test_guided_regex_answers_match_in_full(client, model):
    pattern = r"[0-9]{3}-(yes|no)( [a-z]{1,4}){0,2}"
    for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 1}):
        content, reason = ask(
            client, model, "Go.", extra_body={"guided_regex": pattern}, **sampling
        )
        assert reason == "stop" and re.fullmatch(pattern, content), content


def error_of(client, model, **kw) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, max_tokens=5, **kw)
    return e.value.body


@pytest.mark.parametrize(
    "kw, param, says",
    [
        ({"response_format": schema_format({"type": "strnig"})},
         "response_format.json_schema.schema", "Invalid type"),
        ({"response_format": schema_format({"$ref": "#/$defs/none"}, strict=False)},
         "response_format.json_schema.schema", "does not exist"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "needs"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema", "Field required"),
        ({"extra_body": {"guided_regex": "(("}}, "guided_regex", "unclosed group"),
        ({"tools": [TOOLS[0], {"type": "function", "function": {
            "name": "bad", "parameters": {"type": "object", "dependentSchemas": {"a": {}},
                                          }, "strict": True}}], "tool_choice": "required"},
         "tools[1].function.parameters", "Unimplemented"),
        ({"response_format": {"type": "json_object"}, "tools": TOOLS, "tool_choice": "required"},
         "tool_choice", "cannot be combined"),
    ],
)  # fmt: skip
def test_a_grammar_that_cannot_compile_is_a_400_naming_it(server, client, model, kw, param, says):
    # The picture does not exist: the grammar is refused before any media is read.
    part = {"type": "image_url", "image_url": {"url": "file:///nowhere/missing.png"}}
    messages = [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]
    error = error_of(client, model, messages=messages, **kw)
    assert error["param"] == param and says in error["message"], error
    assert server.engine.stats()["free_slots"] == server.engine.config.max_num_seqs


def test_without_llguidance_a_structured_request_is_a_400_naming_the_extra(
    client, model, monkeypatch
):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # any import of it now fails
    error = error_of(
        client, model, messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_object"},
    )  # fmt: skip
    assert 'pip install "qwen2vl[serve]"' in error["message"]
    assert error["param"] == "response_format"


# ---- the engine: a constrained row beside free ones -----------------------------------------


def test_a_constrained_row_leaves_the_rows_beside_it_unchanged(ckpt):
    pipe = Pipeline.from_pretrained(ckpt, dtype="float32")
    tok = pipe.processor.tokenizer
    free = [("Tell me a story.", 14), ("Hello there, how are you doing today?", 10)]
    constrained = Grammar(tok, grammar.json_schema(PERSON))

    def run(jobs):
        engine = Engine(pipe.model, pipe.processor, EngineConfig(max_num_seqs=4, max_model_len=256))
        outs = []
        for text, n, answer in jobs:
            ids = pipe.processor.encode(
                [{"role": "user", "content": text}], add_generation_prompt=True
            ).ids
            outs.append([])
            engine.submit(
                Request(ids, params=SamplingParams(max_new_tokens=n), grammar=answer),
                outs[-1].append,
            )
        while not all(o and isinstance(o[-1], Finish) for o in outs):
            engine.step()
        return ["".join(e.text for e in o if isinstance(e, Delta)) for o in outs]

    alone = [run([(text, n, None)])[0] for text, n in free]
    together = run([("Describe it.", 60, constrained), *[(t, n, None) for t, n in free]])
    assert together[1:] == alone
    jsonschema.validate(json.loads(together[0]), PERSON)
