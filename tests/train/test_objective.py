"""Objectives: the trainer calls each at the documented points in order, adds its loss, records
its metrics, lets one answer the token loss, and leaves nothing on the model it trained."""

import pytest
import torch

import qwen2vl
from qwen2vl.synth.box_attention import BoxAttention
from qwen2vl.synth.box_regression import BoxRegression
from qwen2vl.synth.vocab import LumpedVocab
from qwen2vl.train import SampleList, TrainConfig, loss_sum, train
from qwen2vl.train.metrics import read_metrics
from qwen2vl.train.objective import Objective

OPTIONS = dict(stage=3, lr=1e-2, warmup_steps=1, max_tokens=512)


class L2Penalty(Objective):
    """`weight` times the mean square of decoder layer 0's output, read through the taps; it
    writes down every call it gets."""

    name = "l2"

    def __init__(self, weight: float):
        self.weight, self.calls, self.pending, self.sums = weight, [], [], [0.0, 0]

    def prepare(self, run):
        self.calls.append(("prepare", run.engine))

    def look(self, batch):
        self.calls.append("look")

    def tap(self, taps):
        self.calls.append("tap")
        taps.layer_output[0] = self._on_output

    def _on_output(self, h):
        self.calls.append("output")
        self.pending.append(h.pow(2).mean())

    def token_loss(self, run, inputs, keep, targets, taps):
        self.calls.append("token_loss")
        return None

    def loss(self):
        self.calls.append("loss")
        (penalty,) = self.pending
        self.pending = []
        self.sums = [self.sums[0] + float(penalty.detach()), self.sums[1] + 1]
        return self.weight * penalty

    def after_step(self, run, lr):
        self.calls.append(("after_step", lr, run.engine))

    def metrics(self, run):
        self.calls.append("metrics")
        total, count = self.sums
        self.sums = [0.0, 0]
        return {"l2": total / count}


def test_the_trainer_calls_an_objective_at_each_point_in_order(tiny64, tmp_path):
    model, penalty = tiny64.model(), L2Penalty(0.1)
    cfg = TrainConfig(output=str(tmp_path), max_steps=3, grad_accum=2, **OPTIONS)
    train(cfg, model=model, data=SampleList(tiny64.samples(6)), objectives=[penalty])
    records = read_metrics(tmp_path / "metrics.jsonl")
    micro = ["look", "tap", "token_loss", "output", "loss"]
    step = [*micro, *micro, "after_step", "metrics"]
    names = [c[0] if isinstance(c, tuple) else c for c in penalty.calls]
    assert names == ["prepare", *step * 3]
    assert penalty.calls[0] == ("prepare", None)  # before the model is wrapped
    after = [c for c in penalty.calls if c[0] == "after_step"]
    assert [lr for _, lr, _ in after] == [r["lr"] for r in records]
    assert all(engine is model for _, _, engine in after)  # one process: not wrapped
    assert len(records) == 3 and all(r["l2"] > 0 for r in records)


def test_an_objectives_loss_is_optimised_and_a_zero_weight_changes_nothing(tiny64, tmp_path):
    samples = SampleList(tiny64.samples(4))
    runs = {}
    for weight in (None, 0.0, 30.0):
        objectives = [] if weight is None else [L2Penalty(weight)]
        cfg = TrainConfig(output=str(tmp_path / str(weight)), max_steps=20, **OPTIONS)
        result = train(cfg, model=tiny64.model(), data=samples, objectives=objectives)
        runs[weight] = result.losses, read_metrics(tmp_path / str(weight) / "metrics.jsonl")
    assert runs[0.0][0] == runs[None][0]  # adding 0 x penalty: the same steps, bit for bit
    free, pushed = runs[0.0][1][-1]["l2"], runs[30.0][1][-1]["l2"]
    assert pushed < 0.5 * free, (free, pushed)


class DoubledTokenLoss(Objective):
    """Scores the tokens itself: twice the trainer's own token loss."""

    def token_loss(self, run, inputs, keep, targets, taps):
        return 2 * loss_sum(run.engine(**inputs, logits_to_keep=keep, taps=taps).logits, targets)


def test_the_first_objective_that_answers_the_token_loss_replaces_the_trainers(tiny64, tmp_path):
    samples = SampleList(tiny64.samples(4))
    losses = {}
    for name, objectives in (("plain", []), ("doubled", [L2Penalty(0.0), DoubledTokenLoss()])):
        cfg = TrainConfig(output=str(tmp_path / name), max_steps=1, **OPTIONS)
        losses[name] = train(cfg, model=tiny64.model(), data=samples, objectives=objectives).losses
    assert losses["doubled"] == pytest.approx([2 * losses["plain"][0]], rel=1e-6)


def recipe_objectives():
    return [LumpedVocab(), BoxAttention(1.0), BoxRegression(1.0)]


def hooks_left(model: torch.nn.Module) -> list[str]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [
        f"{name}.{kind}" for name, m in model.named_modules() for kind in kinds if getattr(m, kind)
    ]


def test_a_trained_model_keeps_no_hooks_and_trains_again_like_a_fresh_one(
    tiny_ckpt, tmp_path, helpers
):
    data = helpers.write_grounding(tmp_path, 6)

    def run(model, out):
        cfg = TrainConfig(model=str(tiny_ckpt), data=str(data), output=str(tmp_path / out),
                          max_steps=3, lr=1e-2, warmup_steps=1, max_tokens=256)  # fmt: skip
        losses = train(cfg, model=model, objectives=recipe_objectives()).losses
        return losses, read_metrics(tmp_path / out / "metrics.jsonl")

    model = qwen2vl.load_model(tiny_ckpt)
    _, records = run(model, "first")
    assert all(r["box_attention"] is not None for r in records)  # the objectives took part
    assert hooks_left(model) == []
    fresh = qwen2vl.Qwen2VL(model.cfg)
    fresh.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})
    again, fresh_run = run(model, "again"), run(fresh, "fresh")
    assert again[0] == fresh_run[0]
    for a, b in zip(again[1], fresh_run[1], strict=True):
        assert (a["box_attention"], a["box_regression"]) == (
            b["box_attention"],
            b["box_regression"],
        )
    for (name, p), q in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
