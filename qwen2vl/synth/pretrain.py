"""Vision pretraining: the default model's ViT (and merger) learn to see the synthetic world.

    pretrain_vision(PretrainConfig(model=INIT, output=OUT, steps=N, batch=B, lr=LR, seed=S))

The real Qwen2-VL does not train its vision tower from nothing: it starts from DFN's CLIP ViT.
A ViT trained from random weights only through the language model learns slowly (measured on
the default model: after 16k shape questions it still could not tell a square from a star,
while the same ViT with a direct readout learns it from 25k pictures in a minute). So the
recipe pretrains the tower first, with throwaway linear heads on the merger's output tokens
that predict the scene's dense labels (`labels.py`: what object covers each token, its box and
the digits a grounding answer writes for it, where the token is, which character of the text
it shows) and, through attention pooling, a few per-item
values (a lone object's shape, object count, text, video motion). Only the ViT and the merger
are trained; the LLM weights are copied through untouched.

Samples come from a pool of `pool` scenes (drawn from `seed`, processed once), read in a seeded
order, epoch after epoch: the run is a fixed function of its config.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.processor import Processor, load_processor
from qwen2vl.synth.box_regression import box_loss
from qwen2vl.synth.dataset import conversation, make_sample
from qwen2vl.synth.labels import (
    BOX_DIGITS,
    HEADS,
    ITEM_HEADS,
    ITEM_SETS,
    MAX_TEXT,
    ItemLabels,
    scene_labels,
)
from qwen2vl.synth.tasks import ALL_TASKS
from qwen2vl.train.checkpoint import copy_processor_files
from qwen2vl.train.optim import adamw
from qwen2vl.weights import load_model, save_pretrained

log = logging.getLogger("qwen2vl.synth.pretrain")
# Loss weights (1 when absent). The summed gradient is clipped as one, so a head's weight is its
# share of every step: rarely labelled heads (a lone object's shape, the count) need more, the
# four text heads' large losses would crowd out the rest; NOTES.md has the measurements.
LOSS_WEIGHTS = {
    "shape": 4.0,
    "count": 3.0,
    "box": 2.0,
    "where": 2.0,
    **dict.fromkeys(BOX_DIGITS, 0.5),
    **{f"text_{k}": 0.25 for k in range(MAX_TEXT)},
}
_NOT_LOSSES = ("step", "lr", "time")


@dataclass
class PretrainConfig:
    model: str  # checkpoint to start from (usually `qwen2vl init`'s)
    output: str
    steps: int = 1500
    batch: int = 32  # scenes per step
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    # scenes drawn and processed up front (~0.23 MB each); too few, seen many times each, and
    # counting overfits
    pool: int = 24000
    seed: int = 0
    tasks: list[str] = field(default_factory=lambda: list(ALL_TASKS))
    # a task's share of the pool relative to the others (1 when absent); videos cost the most
    # patches per item
    task_weights: dict[str, float] = field(default_factory=dict)
    log_every: int = 50

    def __post_init__(self) -> None:
        # an empty pool would leave the epoch loop in `_order` drawing nothing forever
        if min(self.steps, self.batch, self.pool, self.log_every) < 1:
            raise ValueError("steps, batch, pool and log_every must be >= 1")
        if not self.tasks:
            raise ValueError("tasks must name at least one task")
        unknown = sorted(set(self.task_weights) - set(self.tasks))
        if unknown:
            raise ValueError(f"task_weights name tasks not pretrained on: {unknown}")
        weights = self.weights()
        if not all(math.isfinite(w) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"task weights must be >= 0 and one > 0, got {self.task_weights}")

    def weights(self) -> list[float]:
        """Each of `tasks`' weight, 1 where `task_weights` gives none."""
        return [self.task_weights.get(t, 1.0) for t in self.tasks]


@dataclass
class _Item:
    pixel_values: torch.Tensor
    grid: tuple[int, int, int]
    labels: ItemLabels


class Heads(nn.Module):
    """Linear readouts of the merger's output tokens: per token, and per item through attention
    pooling (each item head weighs the item's tokens by its own learnt score, as an LLM head
    attending to the picture can; with a plain mean a lone object's shape was not learnt)."""

    def __init__(self, width: int):
        super().__init__()
        self.token = nn.ModuleDict({k: nn.Linear(width, n) for k, n in HEADS.items()})
        self.item = nn.ModuleDict({k: nn.Linear(width, n) for k, n in ITEM_HEADS.items()})
        self.sets = nn.ModuleDict({k: nn.Linear(width, n) for k, n in ITEM_SETS.items()})
        self.score = nn.ModuleDict({k: nn.Linear(width, 1) for k in [*ITEM_HEADS, *ITEM_SETS]})
        self.box = nn.Linear(width, 4)
        self.where = nn.Linear(width, 2)

    def pool(self, name: str, feats: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """[items, E]: each item's tokens (consecutive `sizes` rows of feats) weighted by head
        `name`'s softmax scores."""
        scores = self.score[name](feats).squeeze(-1)
        return torch.stack(
            [
                (w.softmax(0)[:, None] * f).sum(0)
                for w, f in zip(scores.split(sizes), feats.split(sizes), strict=True)
            ]
        )


def encode_pool(processor: Processor, cfg: PretrainConfig) -> list[_Item]:
    """`cfg.pool` scenes (`pool_plan`), through the same processor the VLM stages use."""
    items = []
    for task, index in pool_plan(cfg):
        sample = make_sample(task, seed=cfg.seed, index=index)
        visuals = processor.encode(conversation(sample, answer=False)).visuals
        grids = [v.grid_thw for v in visuals]
        labels = scene_labels(sample, grids, processor.media.merge_size)
        items += [  # bf16 halves the pool's memory; the shipped model reads pixels in bf16 too
            _Item(v.pixel_values.to(torch.bfloat16), v.grid_thw, lab)
            for v, lab in zip(visuals, labels, strict=True)
        ]
    return items


def pool_plan(cfg: PretrainConfig) -> list[tuple[str, int]]:
    """(task, sample index) of every pool scene: tasks in turn, each as often as its weight
    says (smooth weighted round robin: equal weights give plain turns)."""
    weights = cfg.weights()
    total = sum(weights)
    credit, taken = [0.0] * len(weights), [0] * len(weights)
    plan = []
    for _ in range(cfg.pool):
        credit = [c + w for c, w in zip(credit, weights, strict=True)]
        k = max(range(len(weights)), key=credit.__getitem__)  # the first on ties
        credit[k] -= total
        plan.append((cfg.tasks[k], taken[k]))
        taken[k] += 1
    return plan


def losses(heads: Heads, feats: torch.Tensor, items: list[_Item]) -> dict[str, torch.Tensor]:
    """Every head's loss on a batch: feats [N, E] are the merger's tokens of `items` in order."""

    def cat(arrays) -> torch.Tensor:
        return torch.from_numpy(np.concatenate(list(arrays)))

    out = {}
    for name, head in heads.token.items():
        target = cat(it.labels.tokens[name] for it in items)
        if (target >= 0).any():
            out[name] = F.cross_entropy(head(feats), target, ignore_index=-1)
    on = cat(it.labels.tokens["colour"] for it in items) > 0
    if on.any():
        box = cat(it.labels.box for it in items)
        out["box"] = box_loss(heads.box(feats[on]).sigmoid(), box[on])
    out["where"] = F.l1_loss(heads.where(feats).sigmoid(), cat(it.labels.where for it in items))
    sizes = [len(it.labels.where) for it in items]
    for name, head in heads.item.items():
        target = torch.tensor([it.labels.item[name] for it in items])
        if (target >= 0).any():
            pooled = heads.pool(name, feats, sizes)
            out[name] = F.cross_entropy(head(pooled), target, ignore_index=-1)
    for name, head in heads.sets.items():
        target = torch.from_numpy(np.stack([it.labels.sets[name] for it in items]))
        out[name] = F.binary_cross_entropy_with_logits(head(heads.pool(name, feats, sizes)), target)
    return out


def pretrain_vision(cfg: PretrainConfig) -> list[dict[str, float]]:
    """Train the ViT + merger of cfg.model on the pool; write the whole model to cfg.output.
    Returns the logged records (mean losses over each log interval)."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, dtype="float32")
    processor = load_processor(cfg.model)
    t0 = time.monotonic()
    pool = encode_pool(processor, cfg)
    log.info("vision pretraining: %d items from %d scenes in %.0f s", len(pool), cfg.pool,
             time.monotonic() - t0)  # fmt: skip
    vit = model.visual.train()
    heads = Heads(model.cfg.vision.hidden_size)
    params = list(vit.parameters()) + list(heads.parameters())
    opt = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = _order(len(pool), cfg)
    records, sums = [], {}
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        lr *= 0.5 * (1 + np.cos(np.pi * step / cfg.steps))  # cosine to zero
        for group in opt.param_groups:
            group["lr"] = lr
        batch = [pool[i] for i in order[step * cfg.batch : (step + 1) * cfg.batch]]
        pv = torch.cat([it.pixel_values for it in batch]).float()
        grid = torch.tensor([it.grid for it in batch])
        parts = losses(heads, vit(pv, grid), batch)
        total = sum(LOSS_WEIGHTS.get(k, 1.0) * v for k, v in parts.items())
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in parts.items():
            sums.setdefault(k, []).append(v.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, "lr": lr, "time": time.monotonic() - t0}
            record |= {k: float(np.mean(v)) for k, v in sums.items()}
            records.append(record)
            shown = "  ".join(f"{k} {v:.3f}" for k, v in record.items() if k not in _NOT_LOSSES)
            log.info("step %d/%d  %s", step + 1, cfg.steps, shown)
            sums = {}
    _save(model, cfg, records)
    return records


def _order(n: int, cfg: PretrainConfig) -> list[int]:
    """Item indices for every step: seeded permutations of the pool, one per epoch."""
    need = cfg.steps * cfg.batch
    rng = np.random.default_rng(cfg.seed)
    out: list[int] = []
    while len(out) < need:
        out += rng.permutation(n).tolist()
    return out[:need]


def _save(model, cfg: PretrainConfig, records: list[dict[str, float]]) -> None:
    out = Path(cfg.output)
    save_pretrained(model, out, dtype=torch.float32)
    copy_processor_files(cfg.model, out)
    with open(out / "vision_pretrain.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"config": asdict(cfg)}) + "\n")
        for r in records:
            f.write(json.dumps(r) + "\n")
