"""Box attention: an objective that teaches chosen LLM heads to look at the boxed object.

Letters: T tokens of the packed row, Q supervised query positions, D head dim.

A grounding answer ``<|box_start|>(x1,y1),(x2,y2)<|box_end|>`` names the image tokens it is
about. While the answer starts writing the box (the first ``tokens`` positions from
``<|box_start|>``, where nothing but the object's name tells which object is meant), the loss
asks each supervised head of one layer to put its attention on the image tokens the box covers:
``-log(sum of the head's attention on those tokens)``, summed over positions and heads.

Why: a small LLM learns to *bind* a name to one of several objects very slowly from the answer's
tokens alone (they hold one or two tokens of signal per sample: once x1 is written, the rest can
be found by place). What it bought the default model is in NOTES.md.

The targets come from the packed row alone (ids, the box text, the image grid): any grounding
data in Qwen2-VL's format can use it, no extra fields. Samples with other than one image, or a box
that is not one ``(x1,y1),(x2,y2)`` pair, are left out.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from qwen2vl.errors import ConfigError
from qwen2vl.grounding import SCALE, parse_box_body
from qwen2vl.model.qwen2vl import IGNORE_INDEX
from qwen2vl.model.rope import apply_rotary
from qwen2vl.model.text import DecoderTaps
from qwen2vl.tokenizer import BOX_END, BOX_START, Tokenizer
from qwen2vl.train import distributed as D
from qwen2vl.train.objective import Objective, Run
from qwen2vl.train.packing import PackedBatch

log = logging.getLogger("qwen2vl.train")
MIN_COVER = 0.2  # a merged cell is the object's when the box covers this much of it


@dataclass
class BoxAttentionPlan:
    queries: torch.Tensor  # [Q] positions in the row whose attention is supervised
    target: torch.Tensor  # [Q, T] bool: the boxed object's image tokens
    visible: torch.Tensor  # [Q, T] bool: the keys the query attends to (its sample, causal)


def box_cells(box: tuple[float, float, float, float], rows: int, cols: int) -> list[int]:
    """Indices (row-major) of the merged cells of a rows x cols grid that a box in [0, 1)
    coordinates covers by at least MIN_COVER of a cell, or else the one it covers most."""
    x1, y1, x2, y2 = box
    cover = []
    for r in range(rows):
        for c in range(cols):
            ox = max(0.0, min(x2, (c + 1) / cols) - max(x1, c / cols)) * cols
            oy = max(0.0, min(y2, (r + 1) / rows) - max(y1, r / rows)) * rows
            cover.append(ox * oy)
    cells = [i for i, a in enumerate(cover) if a >= MIN_COVER]
    if not cells and max(cover) > 0:
        cells = [max(range(len(cover)), key=cover.__getitem__)]
    return cells


def plan_box_attention(
    batch: PackedBatch, tokenizer: Tokenizer, *, image_token_id: int, merge: int, tokens: int
) -> BoxAttentionPlan | None:
    """The supervised positions of a packed row and their target keys; None when the row holds
    no usable grounding answer."""
    ids = batch.input_ids[0].tolist()
    bounds = batch.cu_seqlens.tolist()
    grids = [] if batch.image_grid_thw is None else batch.image_grid_thw.tolist()
    n_images = 0
    queries, targets, starts = [], [], []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        runs = _runs(ids, a, b, image_token_id)  # one run of image tokens per image
        sample_grids = grids[n_images : n_images + len(runs)]
        n_images += len(runs)
        if len(runs) != 1:
            continue
        (first, last), (_, h, w) = runs[0], sample_grids[0]
        rows, cols = h // merge, w // merge
        if last - first != rows * cols:
            continue
        for p, end, box in answer_boxes(ids, batch.targets, tokenizer, a, b):
            cells = box_cells(box, rows, cols)
            if not cells:
                continue
            for q in range(p, min(p + tokens, end)):
                queries.append(q)
                targets.append([first + c for c in cells])
                starts.append(a)
    if not queries:
        return None
    T = len(ids)
    target = torch.zeros(len(queries), T, dtype=torch.bool)
    visible = torch.zeros(len(queries), T, dtype=torch.bool)
    for i, (q, cells, a) in enumerate(zip(queries, targets, starts, strict=True)):
        target[i, cells] = True
        visible[i, a : q + 1] = True
    return BoxAttentionPlan(torch.tensor(queries), target, visible)


def answer_boxes(
    ids: list[int], targets: torch.Tensor, tokenizer: Tokenizer, a: int = 0, b: int | None = None
) -> list[tuple[int, int, tuple[float, float, float, float]]]:
    """(position of <|box_start|>, of <|box_end|>, the box in [0, 1)) of each box body holding
    one box that an answer writes in a packed row's ids[a:b] (next-token `targets` tell what is
    trained)."""
    b = len(ids) if b is None else b
    box_start, box_end = tokenizer.special_id(BOX_START), tokenizer.special_id(BOX_END)
    found = []
    for p in range(a, b):
        if ids[p] != box_start or targets[p] == IGNORE_INDEX:
            continue  # only boxes the sample's answer writes
        end = next((e for e in range(p + 1, b) if ids[e] == box_end), None)
        boxes = parse_box_body(tokenizer.decode(ids[p + 1 : end])) if end else []
        if len(boxes) == 1:
            box = boxes[0]
            found.append((p, end, (box.x1 / SCALE, box.y1 / SCALE, box.x2 / SCALE, box.y2 / SCALE)))
    return found


def _runs(ids: list[int], a: int, b: int, token: int) -> list[tuple[int, int]]:
    """[start, end) of each run of `token` in ids[a:b]."""
    runs, i = [], a
    while i < b:
        if ids[i] != token:
            i += 1
            continue
        j = i
        while j < b and ids[j] == token:
            j += 1
        runs.append((i, j))
        i = j
    return runs


def box_attention_nll(
    attn: nn.Module,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    plan: BoxAttentionPlan,
    heads: list[int],
) -> torch.Tensor:
    """Sum over the plan's queries and `heads` of -log(attention on the target keys), for the
    text model's Attention module `attn` given its inputs x [1, T, E] and rotary cos/sin [1, T, D].
    Recomputes only the supervised heads' scores at the supervised positions (float32)."""
    D = attn.head_dim
    T = x.shape[1]
    queries = plan.queries.to(x.device)
    q = attn.q_proj(x[:, queries]).view(1, -1, attn.num_heads, D).transpose(1, 2)  # [1, H, Q, D]
    # keys from detached inputs: the loss moves the layer's projections and the query side, never
    # the image features that every other question reads (with them attached, colour naming fell)
    k = attn.k_proj(x.detach()).view(1, T, attn.num_kv_heads, D).transpose(1, 2)  # [1, K, T, D]
    cq, sq = cos[:, queries].unsqueeze(1), sin[:, queries].unsqueeze(1)
    q, k = apply_rotary(q, cq, sq), apply_rotary(k, cos.unsqueeze(1), sin.unsqueeze(1))
    group = attn.num_heads // attn.num_kv_heads
    visible, target = plan.visible.to(x.device), plan.target.to(x.device)
    total = x.new_zeros((), dtype=torch.float32)
    for h in heads:
        scores = q[0, h].float() @ k[0, h // group].float().T / math.sqrt(D)  # [Q, T]
        logp = scores.masked_fill(~visible, float("-inf")).log_softmax(-1)
        total = total - torch.logsumexp(logp.masked_fill(~target, float("-inf")), -1).sum()
    return total


class BoxObjective(Objective):
    """What the two box objectives share: a plan per micro-batch (`look`), the losses its taps
    collect during the forward, their weighted sum (`loss`) and the step's mean (`metrics`)."""

    name = "box"

    def __init__(self, weight: float):
        if not weight >= 0:
            raise ConfigError(f"{self.name}: weight must be >= 0, got {weight}")
        self.weight = weight
        self.plan = None
        self.losses: list[torch.Tensor] = []
        self.sums = [0.0, 0.0]  # this step's summed loss, supervised units

    def supervised(self, plan) -> int:
        """How many units (positions, heads) the plan's loss sums over."""
        raise NotImplementedError

    def loss(self) -> torch.Tensor | None:
        losses, self.losses = self.losses, []
        plan, self.plan = self.plan, None
        if not losses:
            return None
        nll = torch.stack(losses).sum()
        self.sums[0] += float(nll.detach())
        self.sums[1] += self.supervised(plan)
        return self.weight * nll

    def metrics(self, run: Run) -> dict[str, float | None]:
        total, count = D.all_reduce_sum(self.sums, run.env)
        self.sums = [0.0, 0.0]
        return {self.name: total / count if count else None}


class BoxAttention(BoxObjective):
    """The objective: `weight` times the summed -log attention mass on the boxed object, for
    `heads` of decoder layer `layer` (default: the middle one; heads: one per key/value group)
    at the first `tokens` positions of each answer's box."""

    name = "box_attention"

    def __init__(
        self,
        weight: float = 1.0,
        *,
        layer: int | None = None,
        heads: list[int] | None = None,
        tokens: int = 2,
    ):
        super().__init__(weight)
        if tokens < 1:
            raise ConfigError(f"box_attention: tokens must be >= 1, got {tokens}")
        self.layer, self.heads, self.tokens = layer, heads, tokens

    def prepare(self, run: Run) -> None:
        cfg, text = run.cfg, run.net.cfg.text
        if cfg.gradient_checkpointing or (run.env.distributed and cfg.strategy == "fsdp"):
            raise ConfigError(
                "box_attention cannot be combined with gradient_checkpointing or fsdp"
            )
        if self.layer is None:
            self.layer = text.num_hidden_layers // 2
        if not 0 <= self.layer < text.num_hidden_layers:
            raise ConfigError(
                f"box_attention layer {self.layer}: the model has {text.num_hidden_layers} layers"
            )
        group = text.num_attention_heads // text.num_key_value_heads
        if self.heads is None:  # one query head per key/value head
            self.heads = list(range(0, text.num_attention_heads, group))
        if not self.heads or any(not 0 <= h < text.num_attention_heads for h in self.heads):
            raise ConfigError(
                f"box_attention heads {self.heads}: the model has {text.num_attention_heads} heads"
            )
        self.attn = run.net.model.layers[self.layer].self_attn
        self.tokenizer, self.model_cfg = run.tokenizer, run.net.cfg
        if run.env.main:
            log.info("box attention: layer %d, heads %s, %d answer positions, weight %g",
                     self.layer, self.heads, self.tokens, self.weight)  # fmt: skip

    def look(self, batch: PackedBatch) -> None:
        self.plan = plan_box_attention(
            batch,
            self.tokenizer,
            image_token_id=self.model_cfg.image_token_id,
            merge=self.model_cfg.vision.spatial_merge_size,
            tokens=self.tokens,
        )

    def tap(self, taps: DecoderTaps) -> None:
        if self.plan is not None:
            taps.attention_input[self.layer] = self._on_input

    def _on_input(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        if torch.is_grad_enabled():
            self.losses.append(box_attention_nll(self.attn, x, cos, sin, self.plan, self.heads))

    def supervised(self, plan: BoxAttentionPlan) -> int:
        return len(plan.queries) * len(self.heads)
