"""Greedy generation is token-identical to transformers' generate (fp32, tiny random models)."""

import pytest
import torch
from tiny import CASES, IMAGE, VIDEO, batch

import qwen2vl
from qwen2vl.generation.generate import generate
from qwen2vl.generation.sampling import SamplingParams

STOP = [151645, 151643]


@pytest.fixture(scope="module")
def ours(saved_untied):
    return qwen2vl.load_model(saved_untied, dtype="float32")


def reference(hf, inputs, n):
    ids = inputs["input_ids"]
    extra = {"mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int()}
    with torch.no_grad():
        out = hf.generate(
            **inputs,
            **extra,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=STOP,
            pad_token_id=151643,
        )
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in STOP), len(row))
        rows.append(row[:cut])
    return rows


@pytest.mark.parametrize("case", ["text_only", "one_image", "one_video", "left_padded_batch"])
def test_greedy_matches_transformers_generate(case, ours, hf_untied):
    inputs = batch(*CASES[case])
    got = generate(ours, inputs, SamplingParams(max_new_tokens=64), stop_token_ids=STOP)
    assert got == reference(hf_untied, inputs, 64)
    assert all(len(r) == 64 or r[-1] in STOP for r in got)
