"""The JSON-object prefix automaton, its closing text, and constrained picks on random logits."""

from __future__ import annotations

import json
import random

import pytest
import torch

from qwen2vl.serve.json_mode import START, JsonConstraint, advance, closing_text, token_table
from qwen2vl.tokenizer import Tokenizer


def random_value(rng: random.Random, depth: int = 0):
    r = rng.random()
    if depth < 3 and r < 0.25:
        return {f'k{i}"\\é': random_value(rng, depth + 1) for i in range(rng.randint(0, 3))}
    if depth < 3 and r < 0.45:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice([1, -0.5, 1e-7, 0, 123, 'a\u00e9\n"', True, False, None, "\\u", 3.5e20])


def test_every_prefix_of_json_objects_is_accepted_and_closes():
    rng = random.Random(0)
    for _ in range(100):
        obj = {"a": random_value(rng), "b": random_value(rng)}
        text = json.dumps(obj, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
        data, state = text.encode(), START
        for i in range(len(data)):
            state = advance(state, data[i : i + 1])
            assert state is not None, data[: i + 1]
            completed = (data[: i + 1] + closing_text(state)).decode(errors="replace")
            json.loads(completed)
        assert state[0] == "done"


@pytest.mark.parametrize(
    "text",
    ["[1]", '{"a" 1}', '{"a":01}', '{"a":1,}', "{} x", '{"a":tru}', '{"a":"\\x"}', '{"a":1.}',
     '{"a":"\x01"}', "{'a':1}"],
)  # fmt: skip
def test_non_json_is_refused(text):
    state = advance(START, text.encode())
    assert state is None or state[0] != "done"


@pytest.fixture(scope="module")
def table():
    return token_table(Tokenizer.from_dir(None), 151936)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_constrained_picks_give_an_object_within_the_budget(table, temperature):
    g = torch.Generator().manual_seed(1)
    for budget in (8, 30):
        c = JsonConstraint(table)
        out = b""
        for i in range(budget):
            logits = torch.randn(151936, generator=g) * 3
            probs = None if temperature == 0 else (logits / temperature).softmax(-1)
            token = c.pick(logits, probs, g, budget=budget - i)
            c.accept(token)
            out += table.data[token]
            if c.done:
                break
        assert c.done and isinstance(json.loads(out.decode(errors="replace")), dict)


def test_special_tokens_and_endless_whitespace_are_refused(table):
    c = JsonConstraint(table)
    assert c.allows(151645) is None  # <|im_end|>
    space = table.encode(" ")[0]
    for _ in range(32):
        c.accept(space)
    assert c.allows(space) is None and c.allows(table.encode("{")[0]) is not None
