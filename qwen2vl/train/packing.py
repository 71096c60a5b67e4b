"""Packing: samples of any length and resolution end to end in one row of up to max_tokens.

Letters: T tokens of the packed row, S samples in it, N vision patches.

A packed row is one B = 1 sequence with `cu_seqlens` marking the samples, so the LLM's attention
never crosses a sample boundary (the ViT already attends per image / per frame), and M-RoPE
positions restart at 0 for each sample. Next-token targets are shifted inside each sample, so no
sample predicts its neighbour's first token.

"Same loss as one by one" means: the packed row's per-token losses are the samples' own per-token
losses, so its summed loss is the sum of the samples' summed losses and its target count the sum of
their counts. The trainer divides summed losses by the target count of the whole optimizer step,
which makes the update independent of how samples are packed or spread over processes.

A row without any image or video gets a tiny dummy image appended (its own sample, no targets),
so every process runs the vision tower in every step: a process skipping it would leave DDP's
gradient all-reduce or FSDP's all-gathers of the ViT waiting forever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.model.qwen2vl import IGNORE_INDEX
from qwen2vl.model.rope import mrope_positions
from qwen2vl.processor import VisualEncoding, position_inputs
from qwen2vl.train.data import Sample, SampleInfo

DUMMY_TOKENS = 3  # <|vision_start|> one merged image token <|vision_end|>
OPEN_ROWS = 64  # rows first fit looks at


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [3, 1, T], restarting at 0 in each sample
    cu_seqlens: torch.Tensor  # [S + 1] int32
    targets: torch.Tensor  # [T] next-token targets, shifted inside each sample; -100 = none
    pixel_values: torch.Tensor | None = None  # [N, C*Tp*P*P]
    image_grid_thw: torch.Tensor | None = None  # [images, 3]
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    samples: int = 0  # real samples (the dummy not counted)

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    @property
    def n_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def model_inputs(self, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Keyword arguments for `Qwen2VL.forward`."""
        names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")
        out = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        out.update(
            input_ids=self.input_ids, position_ids=self.position_ids, cu_seqlens=self.cu_seqlens
        )
        return {k: v.to(device) for k, v in out.items()}


def pack_cost(tokens: int, visual: bool) -> int:
    """Tokens a bin needs for a sample, counting the dummy image a text-only row carries."""
    return tokens if visual else tokens + DUMMY_TOKENS


@dataclass
class _Row:
    ids: list[int]
    tokens: int = 0
    visual: bool = False

    def cost_with(self, info: SampleInfo) -> int:
        return pack_cost(self.tokens + info.tokens, self.visual or info.visual)


def plan_packs(infos: Sequence[SampleInfo], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """First fit in `order` (the caller shuffles): each sample goes to the first open row with
    room. At most OPEN_ROWS rows stay open (the oldest is closed when a new one opens), and rows
    with less room than the shortest sample close at once: linear time on large datasets.
    ValueError for a sample that cannot fit at all."""
    shortest = min((infos[i].tokens for i in order), default=0)
    rows: list[_Row] = []
    closed: list[list[int]] = []
    for i in order:
        info = infos[i]
        if pack_cost(info.tokens, info.visual) > capacity:
            raise ValueError(f"sample {i} has {info.tokens} tokens, over max_tokens {capacity}")
        row = next((r for r in rows if r.cost_with(info) <= capacity), None)
        if row is None:
            if len(rows) == OPEN_ROWS:
                closed.append(rows.pop(0).ids)
            row = _Row([])
            rows.append(row)
        row.ids.append(i)
        row.tokens += info.tokens
        row.visual = row.visual or info.visual
        if capacity - pack_cost(row.tokens, row.visual) < shortest:
            rows.remove(row)
            closed.append(row.ids)
    return closed + [r.ids for r in rows]


def packing_efficiency(infos: Sequence[SampleInfo], packs: list[list[int]], capacity: int) -> float:
    """Real tokens over the tokens the rows could hold (padding never happens; this is what a
    fixed-size batch of max_tokens rows would waste)."""
    used = sum(infos[i].tokens for row in packs for i in row)
    return used / max(1, len(packs) * capacity)


def shuffled(n: int, seed: int, epoch: int) -> list[int]:
    """The sample order of an epoch: a permutation fixed by (seed, epoch)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def dummy_sample(cfg: Qwen2VLConfig) -> Sample:
    """One 2x2-patch black image between its vision tokens, nothing to learn."""
    v = cfg.vision
    m = v.spatial_merge_size
    dim = v.in_channels * v.temporal_patch_size * v.patch_size**2
    visual = VisualEncoding("image", {}, (1, m, m), 1, None, torch.zeros(m * m, dim))
    ids = [cfg.vision_start_token_id, cfg.image_token_id, cfg.vision_end_token_id]
    return Sample(ids=ids, labels=[IGNORE_INDEX] * 3, visuals=[visual])


def collate(samples: Sequence[Sample], cfg: Qwen2VLConfig) -> PackedBatch:
    """Samples end to end into one packed row (with the dummy image when none has media)."""
    real = len(samples)
    if not any(s.visuals for s in samples):
        samples = [*samples, dummy_sample(cfg)]
    ids, targets, positions, lengths = [], [], [], []
    for s in samples:
        ids += s.ids
        targets += list(s.labels[1:]) + [IGNORE_INDEX]  # predict token t+1 at t, inside s only
        positions.append(_positions(s, cfg))
        lengths.append(len(s.ids))
    batch = PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.cat(positions, dim=2),
        cu_seqlens=torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32),
        targets=torch.tensor(targets, dtype=torch.long),
        samples=real,
    )
    for kind, pv, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        items = [v for s in samples for v in s.visuals if v.kind == kind]
        if items:
            setattr(batch, pv, torch.cat([v.pixel_values for v in items]))
            setattr(batch, grid, torch.tensor([v.grid_thw for v in items], dtype=torch.long))
    return batch


def _positions(sample: Sample, cfg: Qwen2VLConfig) -> torch.Tensor:
    """M-RoPE positions [3, 1, t] of one sample, starting at 0."""
    positions, _ = mrope_positions(
        torch.tensor([sample.ids], dtype=torch.long),
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        merge=cfg.vision.spatial_merge_size,
        tokens_per_second=cfg.vision.tokens_per_second,
        **position_inputs(sample.visuals),
    )
    return positions


class PackSchedule:
    """Which packed rows every optimizer step reads: a fixed function of (data, seed, step).

    Epoch e packs the samples in the order `shuffled(n, seed, e)`; optimizer step k of the epoch
    reads its rows k*G .. k*G+G-1, G = processes * grad_accum (the last step of an epoch may get
    fewer). So the data position of a run is its step number, and a resumed run, or one on another
    number of processes with the same G, reads exactly the same rows.
    """

    def __init__(
        self,
        infos: Sequence[SampleInfo],
        *,
        capacity: int,
        rows_per_step: int,
        seed: int,
        epochs: int,
        max_steps: int | None = None,
    ):
        self.infos, self.capacity, self.rows_per_step = infos, capacity, rows_per_step
        self.seed = seed
        self._plan: tuple[int, list[list[int]]] | None = None  # the latest epoch's rows
        self._steps: dict[int, int] = {}  # epoch -> optimizer steps in it
        self.total = max_steps or sum(self.steps_in(e) for e in range(epochs))

    def plan(self, epoch: int) -> list[list[int]]:
        if self._plan is None or self._plan[0] != epoch:
            order = shuffled(len(self.infos), self.seed, epoch)
            self._plan = (epoch, plan_packs(self.infos, self.capacity, order))
        return self._plan[1]

    def steps_in(self, epoch: int) -> int:
        if epoch not in self._steps:
            self._steps[epoch] = -(-len(self.plan(epoch)) // self.rows_per_step)
        return self._steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a 0-based global step."""
        epoch = 0
        while step >= (n := self.steps_in(epoch)):
            step -= n
            epoch += 1
        return epoch, step

    def rows(self, step: int) -> tuple[int, int, list[list[int]]]:
        """(epoch, index of the step's first row in the epoch, the step's rows)."""
        epoch, k = self.locate(step)
        first = k * self.rows_per_step
        return epoch, first, self.plan(epoch)[first : first + self.rows_per_step]


def loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of a packed row: logits [1, T, V], targets [T] (already
    shifted, -100 = none), in float32. Logits of only the target positions (`target_positions`)
    with targets [n] of those positions give the same sum."""
    return F.cross_entropy(
        logits[0].float(), targets.to(logits.device), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def target_positions(targets: torch.Tensor) -> torch.Tensor:
    """Positions [n] of a row's targets: the only logits the loss needs."""
    return (targets != IGNORE_INDEX).nonzero().squeeze(1)
