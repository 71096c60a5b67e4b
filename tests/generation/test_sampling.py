"""SamplingParams refuses what the sampler cannot survive, naming the field, and what it keeps
(a tiny temperature, penalties at their bounds) gives finite probabilities."""

import math

import pytest
import torch
from tiny_qwen2vl import tiny_model

from qwen2vl.errors import SamplingError
from qwen2vl.generation.generate import generate
from qwen2vl.generation.sampling import (
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    MIN_TEMPERATURE,
    SEED_LIMIT,
    SamplingParams,
    apply_repetition_penalty,
    sample,
    top_k_top_p,
)

BAD = [
    ("max_new_tokens", 0),
    ("max_new_tokens", 2.0),
    ("max_new_tokens", True),
    ("temperature", -0.5),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", 10**400),
    ("temperature", "0.7"),
    ("temperature", True),
    ("top_p", 0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_p", None),
    ("top_k", -1),
    ("top_k", 5.0),
    ("top_k", False),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", 1e300),
    ("repetition_penalty", MAX_REPETITION_PENALTY * 1.01),
    ("repetition_penalty", MIN_REPETITION_PENALTY / 2),
    ("repetition_penalty", math.inf),
    ("seed", -1),
    ("seed", SEED_LIMIT),
    ("seed", 7.0),
    ("seed", "7"),
    ("seed", True),
    ("stop_token_ids", 5),
    ("stop_token_ids", [1, -2]),
    ("stop_token_ids", ["a"]),
    ("logprobs", 1),
    ("logprobs", "yes"),
]


@pytest.mark.parametrize(("field", "value"), BAD, ids=[f"{f}={v!r}" for f, v in BAD])
def test_a_bad_field_is_a_sampling_error_naming_only_that_field(field, value):
    with pytest.raises(SamplingError) as caught:
        SamplingParams(**{field: value})
    assert caught.value.param == field
    message = str(caught.value)
    assert message.startswith(f"{field} must be") and "got " in message
    assert "SamplingParams(" not in message


def test_an_overlong_value_is_cut_short_in_the_message():
    with pytest.raises(SamplingError) as caught:
        SamplingParams(temperature="x" * 10_000)
    assert len(str(caught.value)) < 100


def test_values_at_the_edges_are_kept_and_usable():
    p = SamplingParams(
        max_new_tokens=1,
        temperature=MIN_TEMPERATURE,
        top_p=1,
        top_k=0,
        repetition_penalty=MAX_REPETITION_PENALTY,
        seed=SEED_LIMIT - 1,
        stop_token_ids=(0, 5),
        stop="x",
    )
    assert p.temperature == MIN_TEMPERATURE and p.top_p == 1.0 and isinstance(p.top_p, float)
    assert p.stop_token_ids == [0, 5] and p.stop == ["x"]
    assert torch.Generator().manual_seed(p.seed).initial_seed() == SEED_LIMIT - 1
    assert SamplingParams(seed=0, repetition_penalty=MIN_REPETITION_PENALTY).seed == 0


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, MIN_TEMPERATURE / 2])
def test_a_temperature_below_the_minimum_is_greedy(temperature):
    params = SamplingParams(temperature=temperature, seed=1)
    assert params.temperature == 0.0
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    assert sample(logits, params).tolist() == logits.argmax(-1).tolist()


def test_a_tiny_temperature_generates_the_greedy_text():
    model = tiny_model()
    batch = {"input_ids": torch.tensor([[5, 6, 7, 8]]), "attention_mask": torch.ones(1, 4)}
    greedy = generate(model, batch, SamplingParams(max_new_tokens=8), stop_token_ids=[])
    cold = SamplingParams(max_new_tokens=8, temperature=1e-300, top_p=0.9, seed=3)
    assert generate(model, batch, cold, stop_token_ids=[]) == greedy


@pytest.mark.parametrize("penalty", [MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY])
def test_penalties_at_their_bounds_keep_the_coldest_sampling_finite(penalty):
    # logits far beyond a real model's (|logit| < 100), every token seen
    g = torch.Generator().manual_seed(0)
    logits = (torch.rand(3, 1000, generator=g) * 2 - 1) * 1e30
    seen = torch.ones_like(logits, dtype=torch.bool)
    penalised = apply_repetition_penalty(logits, seen, penalty)
    probs = top_k_top_p(penalised / MIN_TEMPERATURE, 50, 0.9).softmax(-1)
    assert torch.isfinite(penalised).all() and torch.isfinite(probs).all()
    params = SamplingParams(temperature=MIN_TEMPERATURE, repetition_penalty=penalty, top_k=50)
    tokens = sample(logits, params, seen=seen, generator=g)
    assert ((tokens >= 0) & (tokens < 1000)).all()
