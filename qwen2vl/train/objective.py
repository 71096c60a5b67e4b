"""Training objectives: the one way to add to what the trainer optimises.

    train(cfg, objectives=[MyLoss(weight=0.5)])

An objective is an object the trainer calls at fixed points of a run; every method has a do-
nothing default, so an objective writes only what it needs:

    prepare(run)        once, after the model is built (and resumed), before DDP/FSDP wrap it:
                        check the run's settings, build heads, read weights
    look(batch)         before each micro-batch: plan from the packed row (e.g. its answers)
    tap(taps)           ask the coming forward for values from inside the decoder (DecoderTaps)
    token_loss(...)     run the forward and score the tokens itself; None leaves it to the
                        trainer (at most one objective of a run answers)
    loss()              its weighted loss of this micro-batch, added to the token loss; or None
    after_step(run, lr) after the optimizer step (e.g. a head's own optimizer)
    metrics(run)        its figures for the step's record, reduced over processes

The model hands out what an objective needs because the call asks for it (``taps``,
``return_hidden``); nothing is left on its modules between calls. An objective serves one run:
`prepare` may fill in settings from that run's model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from torch import nn

from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.model.text import DecoderTaps
from qwen2vl.tokenizer import Tokenizer
from qwen2vl.train.config import TrainConfig
from qwen2vl.train.distributed import DistEnv
from qwen2vl.train.packing import PackedBatch


@dataclass
class Run:
    """What an objective may read of the run it is part of."""

    cfg: TrainConfig
    env: DistEnv
    net: Qwen2VL  # the model itself (not wrapped)
    data: Any  # the run's TrainData
    engine: nn.Module | None = None  # the model as DDP/FSDP wrap it; set after prepare

    @cached_property
    def tokenizer(self) -> Tokenizer:
        processor = getattr(self.data, "processor", None)
        if processor is not None:
            return processor.tokenizer
        return Tokenizer.from_dir(self.cfg.model or None)


class Objective:
    """Base class: override the methods the objective needs (see the module docstring)."""

    name = "objective"

    def prepare(self, run: Run) -> None:
        pass

    def look(self, batch: PackedBatch) -> None:
        pass

    def tap(self, taps: DecoderTaps) -> None:
        pass

    def token_loss(
        self,
        run: Run,
        inputs: dict[str, torch.Tensor],
        keep: torch.Tensor,
        targets: torch.Tensor,
        taps: DecoderTaps,
    ) -> torch.Tensor | None:
        """The summed token loss of a micro-batch at positions `keep` (targets [n]), or None."""
        return None

    def loss(self) -> torch.Tensor | None:
        return None

    def after_step(self, run: Run, lr: float) -> None:
        pass

    def metrics(self, run: Run) -> dict[str, Any]:
        return {}
