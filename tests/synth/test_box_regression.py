"""Box regression: the relative box loss, the positions and boxes read from the packed row, and
trainer runs (the head learns; rows without grounding answers train exactly as without it)."""

import numpy as np
import pytest
import torch
from tiny_train import one_thread  # noqa: F401 (autouse: tiny matmuls run faster on one thread)

import qwen2vl
from qwen2vl.errors import ConfigError
from qwen2vl.processor import load_processor
from qwen2vl.synth.box_regression import BoxRegression, box_loss, plan_box_regression
from qwen2vl.train import TrainConfig
from qwen2vl.train import distributed as D
from qwen2vl.train.data import encode_conversation
from qwen2vl.train.objective import Run
from qwen2vl.train.packing import collate

GROUNDED = (
    "<|object_ref_start|>red square<|object_ref_end|><|box_start|>(500,0),(750,500)<|box_end|>"
)


def test_the_box_loss_weighs_an_error_by_the_objects_size():
    target = torch.tensor([[0.1, 0.2, 0.2, 0.4], [0.0, 0.0, 0.8, 0.5]])
    off = torch.tensor([0.02, 0.02, 0.0, 0.0])  # the same error on both boxes' x1 and y1
    per_box = [box_loss((t + off)[None], t[None]).item() for t in target]
    assert per_box == pytest.approx([(0.02 / 0.1 + 0.02 / 0.2) / 4, (0.02 / 0.8 + 0.02 / 0.5) / 4])
    assert box_loss(target + off, target).item() == pytest.approx(sum(per_box) / 2)
    assert box_loss(target + off, target, reduction="sum").item() == pytest.approx(sum(per_box))
    assert box_loss(target, target).item() == 0
    flat = torch.tensor([[0.3, 0.3, 0.3, 0.5]])  # no width: a finite loss, not inf
    assert torch.isfinite(box_loss(flat + 0.01, flat))


def test_plan_covers_every_position_an_answer_writes_its_box_from(tiny_ckpt, helpers):
    processor = load_processor(tiny_ckpt)
    messages, picture = helpers.conversation, helpers.picture
    samples = [
        encode_conversation(messages(picture(seed=1), "What is it?", "Noise."), processor),
        encode_conversation(messages(picture(), "Find the red square.", GROUNDED), processor),
        # a box the user writes is no answer: not supervised
        encode_conversation(messages(picture(seed=2), f"Is it {GROUNDED}?", "Yes."), processor),
    ]
    cfg = qwen2vl.load_model(tiny_ckpt).cfg
    batch = collate(samples, cfg)
    positions, boxes = plan_box_regression(batch, processor.tokenizer)
    tok = processor.tokenizer
    start = len(samples[0].ids) + samples[1].ids.index(tok.special_id("<|box_start|>"))
    end = len(samples[0].ids) + samples[1].ids.index(tok.special_id("<|box_end|>"))
    assert positions.tolist() == list(range(start, end))
    assert boxes.tolist() == [[0.5, 0.0, 0.75, 0.5]] * (end - start)
    assert plan_box_regression(collate(samples[::2], cfg), tok) is None


def test_training_teaches_the_head_the_box(tiny_ckpt, tmp_path, helpers):
    data = helpers.write_grounding(tmp_path, 16)
    objectives = [BoxRegression(1.0)]
    _, records = helpers.train_briefly(tiny_ckpt, data, tmp_path / "on", objectives=objectives)
    error = [r["box_regression"] for r in records]
    assert all(v is not None for v in error)
    first, last = np.mean(error[:3]), np.mean(error[-3:])
    assert last < 0.8 * first, (first, last)  # 1.28 -> 0.93 (a random model, 40 steps)


def test_without_grounding_answers_training_is_unchanged(tiny_ckpt, make_data, tmp_path, helpers):
    data = make_data(6)
    off, _ = helpers.train_briefly(tiny_ckpt, data, tmp_path / "off")
    objectives = [BoxRegression(1.0)]
    on, records = helpers.train_briefly(tiny_ckpt, data, tmp_path / "on", objectives=objectives)
    assert on.losses == off.losses
    assert {r["box_regression"] for r in records} == {None}


@pytest.mark.parametrize("weight", [-1.0, float("nan")])
def test_a_bad_weight_is_refused_on_construction(weight):
    with pytest.raises(ConfigError):
        BoxRegression(weight)


@pytest.mark.parametrize("layer, options", [(2, {}), (None, {"gradient_checkpointing": True})])
def test_settings_the_run_cannot_meet_are_refused_by_prepare(tiny_ckpt, layer, options):
    cfg = TrainConfig(model=str(tiny_ckpt), **options)
    run = Run(cfg, D.DistEnv(), qwen2vl.load_model(tiny_ckpt), data=None)
    with pytest.raises(ConfigError):  # the tiny model has layers 0 and 1
        BoxRegression(1.0, layer=layer).prepare(run)
