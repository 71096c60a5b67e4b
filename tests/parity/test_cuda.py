"""On a CUDA device: the same logits and greedy tokens as transformers there (skipped without
one; `scripts/test.sh -m gpu` runs only these)."""

import pytest
import torch
from tiny import CASES, IMAGE, STOP, VIDEO, batch, reference

import qwen2vl
from qwen2vl.generation.generate import generate
from qwen2vl.generation.sampling import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def on_cuda(inputs):
    return {k: v.cuda() for k, v in inputs.items()}


@pytest.fixture(autouse=True)
def exact_fp32():
    """cuDNN runs transformers' Conv3d patch embedding in TF32 by default (measured: 4e-4 off
    in the logits on an H200); parity is about the model, so both sides compute in fp32."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.fixture(scope="module")
def pair(saved_untied, hf_untied):
    ours = qwen2vl.load_model(saved_untied, dtype="float32", device="cuda")
    return ours, hf_untied.to("cuda")


@pytest.mark.parametrize("case", ["one_image", "image_and_video", "left_padded_batch"])
def test_fp32_logits_match_transformers_on_cuda(case, pair):
    ours, theirs = pair
    inputs = on_cuda(batch(*CASES[case]))
    ids = inputs["input_ids"]
    extra = {"mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int()}
    with torch.no_grad():
        got = ours(**inputs).logits
        want = theirs(**inputs, **extra).logits
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("case", ["one_image", "one_video", "left_padded_batch"])
def test_greedy_matches_transformers_generate_on_cuda(case, pair):
    ours, theirs = pair
    inputs = on_cuda(batch(*CASES[case]))
    got = generate(ours, inputs, SamplingParams(max_new_tokens=32), stop_token_ids=STOP)
    assert got == reference(theirs, inputs, 32)


def test_cuda_and_cpu_agree(saved_untied, pair):
    ours, _ = pair
    cpu = qwen2vl.load_model(saved_untied, dtype="float32")
    inputs = batch(*CASES["image_and_video"])
    with torch.no_grad():
        a = ours(**on_cuda(inputs)).logits.cpu()
        b = cpu(**inputs).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
