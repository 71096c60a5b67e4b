"""Box regression: an objective that teaches the LLM's hidden state to hold the box it writes.

A box is written digit by digit, and the cross-entropy on those digits is a coarse teacher of
position: a tens digit one off costs as much as five off, and a model reading positions from its
image tokens leans on which 28-pixel cells an object covers (NOTES.md has what it measured).

So while an answer writes a box (every position from ``<|box_start|>`` to the last token before
``<|box_end|>``), a linear head on one decoder layer's output predicts the box's corners
(sigmoid, in [0, 1)), scored by the error relative to the box's side as in the vision
pretraining. The head is the trainer's, not the model's: it has its own optimizer, follows the
run's learning rate, and is not saved (a resumed run starts a fresh one). The targets come from
the answer text alone (``answer_boxes``), so any grounding data in Qwen2-VL's format can use it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qwen2vl.errors import ConfigError
from qwen2vl.model.text import DecoderTaps
from qwen2vl.synth.box_attention import BoxObjective, answer_boxes
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.train import distributed as D
from qwen2vl.train.objective import Run
from qwen2vl.train.optim import adamw, set_lr
from qwen2vl.train.packing import PackedBatch

log = logging.getLogger("qwen2vl.train")


def box_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """L1 error of boxes [N, 4] (x1, y1, x2, y2), each corner's error divided by its box's side
    along that axis: IoU, which grounding is scored by, depends on the error relative to the
    object, so a pixel off a 12-pixel object weighs as much as eight off a 96-pixel one.
    "mean" over all corners, or "sum" over boxes of each box's mean."""
    size = (target[:, 2:] - target[:, :2]).clamp_min(1e-3).repeat(1, 2)
    error = (pred - target).abs() / size
    return error.mean() if reduction == "mean" else error.mean(1).sum()


def plan_box_regression(
    batch: PackedBatch, tokenizer: Tokenizer
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(positions [Q], boxes [Q, 4] in [0, 1)) of a packed row: every position an answer writes
    a box from; None when the row has no grounding answer."""
    ids = batch.input_ids[0].tolist()
    positions, boxes = [], []
    for p, end, box in answer_boxes(ids, batch.targets, tokenizer):
        positions += range(p, end)
        boxes += [box] * (end - p)
    if not positions:
        return None
    return torch.tensor(positions), torch.tensor(boxes, dtype=torch.float32)


class BoxRegression(BoxObjective):
    """The objective: `weight` times the summed relative box error of a linear head on decoder
    layer `layer`'s output (default: the third from last, or the first of a smaller model) at
    every position an answer writes a box from."""

    name = "box_regression"

    def __init__(self, weight: float = 1.0, *, layer: int | None = None):
        super().__init__(weight)
        self.layer = layer

    def prepare(self, run: Run) -> None:
        cfg, text = run.cfg, run.net.cfg.text
        if cfg.gradient_checkpointing:
            raise ConfigError("box_regression cannot be combined with gradient_checkpointing")
        if self.layer is None:
            self.layer = max(0, text.num_hidden_layers - 3)
        if not 0 <= self.layer < text.num_hidden_layers:
            raise ConfigError(
                f"box_regression layer {self.layer}: the model has {text.num_hidden_layers} layers"
            )
        torch.manual_seed(cfg.seed)  # the head's initial weights
        self.head = nn.Linear(text.hidden_size, 4).to(run.env.device)
        # Its own optimizer: the model's stays as saved and resumed (the head is not saved).
        self.optimizer = adamw(
            self.head.parameters(), lr=cfg.lr, betas=cfg.adam_betas, weight_decay=0.0
        )
        self.tokenizer = run.tokenizer
        if run.env.main:
            log.info("box regression: a head on layer %d's output, weight %g",
                     self.layer, self.weight)  # fmt: skip

    def look(self, batch: PackedBatch) -> None:
        self.plan = plan_box_regression(batch, self.tokenizer)

    def tap(self, taps: DecoderTaps) -> None:
        if self.plan is not None:
            taps.layer_output[self.layer] = self._on_output

    def _on_output(self, output: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            positions, boxes = (t.to(output.device) for t in self.plan)
            pred = self.head(output[0, positions].float()).sigmoid()
            self.losses.append(box_loss(pred, boxes, reduction="sum"))

    def supervised(self, plan: tuple[torch.Tensor, torch.Tensor]) -> int:
        return len(plan[0])

    def after_step(self, run: Run, lr: float) -> None:
        D.average_grads(self.head.parameters(), run.env)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
