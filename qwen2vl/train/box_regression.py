"""Box regression: an auxiliary loss that teaches the LLM's hidden state to hold the box it writes.

A box is written digit by digit, and the cross-entropy on those digits is a coarse teacher of
position: a tens digit one off costs as much as five off. The default model, reading positions
from its image tokens, leaned on which 28-pixel cells an object covers: its boxes of lone objects
came out inflated (x1 34 units low and x2 16 high on average, x1 the lower the further it lies
from its cell's left edge: measured on 331 held-out questions).

So while an answer writes a box (every position from ``<|box_start|>`` to the last token before
``<|box_end|>``), a linear head on one decoder layer's output predicts the box's corners
(sigmoid, in [0, 1)), scored by the error relative to the box's side as in the vision
pretraining. The head is the trainer's, not the model's: it has its own optimizer, follows the
run's learning rate, and is not saved (a resumed run starts a fresh one). The targets come from
the answer text alone (``answer_boxes``), so any grounding data in Qwen2-VL's format can use it.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen2vl.tokenizer import Tokenizer
from qwen2vl.train.box_attention import answer_boxes
from qwen2vl.train.packing import PackedBatch


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


class BoxRegression(nn.Module):
    """Hooks one decoder layer: while a plan is set, each forward adds the plan's summed loss
    to ``losses`` (read and clear them around each micro-batch with ``take``)."""

    def __init__(self, layer: nn.Module, hidden: int):
        super().__init__()
        self.head = nn.Linear(hidden, 4)
        self.plan: tuple[torch.Tensor, torch.Tensor] | None = None
        self.losses: list[torch.Tensor] = []
        layer.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.plan is not None and torch.is_grad_enabled():
            positions, boxes = (t.to(output.device) for t in self.plan)
            pred = self.head(output[0, positions].float()).sigmoid()
            self.losses.append(box_loss(pred, boxes, reduction="sum"))

    def take(self) -> torch.Tensor | None:
        """The summed loss of the forwards since the last call (None if none), and clears it."""
        losses, self.losses = self.losses, []
        return torch.stack(losses).sum() if losses else None
