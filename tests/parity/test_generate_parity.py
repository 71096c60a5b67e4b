"""Greedy generation is token-identical to transformers' generate (fp32, tiny random models)."""

import pytest
from tiny import CASES, STOP, batch, reference

import qwen2vl
from qwen2vl.generation.generate import generate
from qwen2vl.generation.sampling import SamplingParams


@pytest.fixture(scope="module")
def ours(saved_untied):
    return qwen2vl.load_model(saved_untied, dtype="float32")


@pytest.mark.parametrize("case", ["text_only", "one_image", "one_video", "left_padded_batch"])
def test_greedy_matches_transformers_generate(case, ours, hf_untied):
    inputs = batch(*CASES[case])
    got = generate(ours, inputs, SamplingParams(max_new_tokens=64), stop_token_ids=STOP)
    assert got == reference(hf_untied, inputs, 64)
    assert all(len(r) == 64 or r[-1] in STOP for r in got)
