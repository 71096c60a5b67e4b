"""Done-when: our training loss on a batch equals transformers' for the same weights and labels."""

import pytest
import torch

import qwen2vl
from qwen2vl.train import TrainConfig, collate, loss_sum, validate

tiny = pytest.importorskip("tiny")  # transformers reference models (skips without transformers)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = tiny.hf_model()
    path = tmp_path_factory.mktemp("hf_tiny")
    hf.save_pretrained(path)
    return hf, qwen2vl.load_model(path), path


def hf_batch(samples):
    """Left-padded batch with labels -100 on padding, the way transformers trains."""
    T = max(len(s.ids) for s in samples)
    ids = torch.tensor([[151643] * (T - len(s.ids)) + s.ids for s in samples])
    labels = torch.tensor([[-100] * (T - len(s.ids)) + s.labels for s in samples])
    mask = torch.tensor([[0] * (T - len(s.ids)) + [1] * len(s.ids) for s in samples])
    visuals = [v for s in samples for v in s.visuals]
    return dict(
        input_ids=ids,
        attention_mask=mask,
        labels=labels,
        mm_token_type_ids=(ids == tiny.IMAGE).int(),  # what its processor returns
        pixel_values=torch.cat([v.pixel_values for v in visuals]),
        image_grid_thw=torch.tensor([v.grid_thw for v in visuals]),
    )


def test_packed_loss_equals_transformers_loss(models, make_data):
    hf, ours, path = models
    data, _ = validate(TrainConfig(model=str(path), data=str(make_data(3)), output="unused"))
    samples = [data[i] for i in range(3)]
    assert len({s.visuals[0].grid_thw for s in samples}) == 3
    with torch.no_grad():
        for group in (samples[:1], samples):
            reference = hf(**hf_batch(group)).loss
            packed = collate(group, ours.cfg)
            loss = loss_sum(ours(**packed.model_inputs()).logits, packed.targets) / packed.n_targets
            assert abs(loss.item() - reference.item()) <= 1e-5, (loss.item(), reference.item())
            padded = {k: v for k, v in hf_batch(group).items() if k != "mm_token_type_ids"}
            assert abs(ours(**padded).loss.item() - reference.item()) <= 1e-5
