"""AdamW over the trainable parameters, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (biases, norms and gains are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return adamw(groups, lr=lr, betas=betas)


def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """torch's AdamW (`params` and `kwargs` as it takes them), fused into one kernel per step
    where torch has that kernel: plain float tensors on CPU or CUDA. torch's default on CPU
    loops over tensors with a dozen passes each; on the default model's 9.7M-value embedding
    that was 35 ms of a 0.30 s training step, fused 3.4 ms, the updates equal to 1 ulp
    (measured). Sharded (FSDP2 DTensor) parameters keep the default path."""
    from torch.distributed.tensor import DTensor  # here: 0.4 s to import, needed once a run

    params = list(params)
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    fused = all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() and not isinstance(p, DTensor)
        for p in tensors
    )
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup from lr/warmup to lr over
    `warmup` steps, then a half cosine from lr down to min_lr at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
