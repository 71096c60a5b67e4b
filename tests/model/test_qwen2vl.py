"""The joined model's forward: return_hidden hands out the final hidden states the logits are
made from (all positions or the kept ones), and refuses labels."""

import pytest
import torch
from tiny_qwen2vl import IMAGE, VEND, VSTART, tiny_model

from qwen2vl.errors import Qwen2VLError

PATCH = 3 * 2 * 14 * 14


def image_prompt():
    ids = torch.tensor([[1, 2, VSTART] + [IMAGE] * 4 + [VEND, 3, 4, 5]])
    pixels = torch.randn(16, PATCH, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": torch.tensor([[1, 4, 4]])}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("keep", [0, 3, torch.tensor([2, 8, 10])])
def test_the_head_of_the_returned_hidden_states_is_the_logits(tie, keep):
    model = tiny_model(tie=tie)
    inputs = image_prompt()
    with torch.no_grad():
        out = model(**inputs, logits_to_keep=keep, return_hidden=True)
        logits = model(**inputs, logits_to_keep=keep).logits
    assert out.logits is None and out.hidden.shape[:2] == logits.shape[:2]
    torch.testing.assert_close(model.lm_head(out.hidden), logits, rtol=0, atol=0)
    torch.testing.assert_close(out.rope_deltas, model(**inputs).rope_deltas, rtol=0, atol=0)


def test_labels_with_return_hidden_are_refused():
    model = tiny_model()
    inputs = image_prompt()
    with pytest.raises(Qwen2VLError, match="labels"):
        model(**inputs, labels=inputs["input_ids"], return_hidden=True)
