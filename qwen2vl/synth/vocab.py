"""Lumped zero rows: a model trained from nothing on a small vocabulary pays for the tokens it uses.

    zero_unused_rows(model, data_token_ids(files, processor))   (unused tokens' rows start at 0)
    train(cfg, objectives=[LumpedVocab()])

The default model uses a few hundred of Qwen2's 151,936 tokens, yet a full-vocabulary loss pays
for all of them: the [targets, V] logits, their softmax and the gradient through them are most of
a training step of a 64-wide model (NOTES.md). A row of the output embedding that is exactly
zero gives every position the logit 0, so with Z such rows

    logsumexp(all logits) = logsumexp(logits of the other rows, log Z)

and the loss needs the logits of the rows that are not zero (or whose token is in the batch) and
one shared column. The loss is the full-vocabulary loss, exactly; the one difference from full
training is that a zero row stays zero until its token occurs in a batch (a full softmax would
push it slightly negative).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2vl.chat import render_ids
from qwen2vl.errors import ConfigError, Qwen2VLError
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.model.text import DecoderTaps
from qwen2vl.processor import Processor
from qwen2vl.train.data import parse_line, read_jsonl
from qwen2vl.train.distributed import DistEnv, all_reduce_any
from qwen2vl.train.objective import Objective, Run

log = logging.getLogger("qwen2vl.train")


def zero_rows(weight: torch.Tensor) -> torch.Tensor:
    """[V] bool: which rows of the output embedding are all zero (the ones lumped)."""
    return weight.detach().eq(0).all(1)


def scored_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sorted ids of the rows scored one by one: those not all zero, and the batch's `ids`
    (the targets among them), zero or not. A run keeps a `LiveRows` instead."""
    return LiveRows(weight).rows(ids)


class LiveRows:
    """`scored_rows` for a run's steps without re-reading the [V, E] table each step (which
    cost ~5 % of a step of the default model, measured). A row can leave zero only in a step whose
    batch holds its token, so after each step (`update`) only the rows of that step's batches
    are read, and the processes merge what they found."""

    def __init__(self, weight: torch.Tensor):
        self.mask = ~zero_rows(weight)
        self.pending: list[torch.Tensor] = []

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The sorted rows to score for a batch of `ids`: the rows not zero, and `ids`."""
        ids = ids.flatten().to(self.mask.device)
        self.pending.append(ids)
        live = self.mask.clone()
        live[ids] = True
        return live.nonzero().squeeze(1)

    def update(self, weight: torch.Tensor, env: DistEnv) -> None:
        """After an optimizer step: mark the rows of this step's batches that are no longer zero,
        here or (`weight` being the same on every process) on any process."""
        if self.pending:
            ids = torch.cat(self.pending).unique()
            self.mask[ids] |= ~zero_rows(weight[ids.to(weight.device)]).to(self.mask.device)
            self.pending = []
        self.mask = all_reduce_any(self.mask, env)


def lumped_loss_sum(
    logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Summed cross-entropy over all `vocab_size` tokens from logits [1, n, K] of `rows` only
    (K sorted ids, as `scored_rows` gives them), targets [n] ids among `rows`, in float32: every
    other row is zero, so its logit is 0 and the Z of them weigh as one logit log Z."""
    logits = logits[0].float()
    lumped = vocab_size - rows.numel()
    if lumped:
        logits = torch.cat([logits, logits.new_full((len(logits), 1), math.log(lumped))], 1)
    targets = targets.to(rows.device)
    where = torch.searchsorted(rows, targets)
    if not bool((rows[where.clamp(max=len(rows) - 1)] == targets).all()):
        raise ValueError("a target token is not among the scored rows")
    return F.cross_entropy(logits, where.to(logits.device), reduction="sum")


class LumpedVocab(Objective):
    """The token loss over every row, computed from the rows not zero and one lumped logit.

    With tied weights the input embedding reads the same gathered rows as the output, so the
    backward scatters into the [V, E] table once, not twice. Not with FSDP (it reads whole rows).
    """

    name = "lumped_vocab"

    def prepare(self, run: Run) -> None:
        if run.env.distributed and run.cfg.strategy == "fsdp":
            raise ConfigError("lumped vocabulary reads whole embedding rows: not with fsdp")
        weight = run.net.lm_head.weight
        self.live = LiveRows(weight)
        if run.env.main:
            zero = int(zero_rows(weight).sum())
            log.info("lumped vocabulary: %d of %d output rows are zero, scored as one logit "
                     "until their token occurs", zero, run.net.cfg.text.vocab_size)  # fmt: skip

    def token_loss(
        self,
        run: Run,
        inputs: dict[str, torch.Tensor],
        keep: torch.Tensor,
        targets: torch.Tensor,
        taps: DecoderTaps,
    ) -> torch.Tensor:
        net, device = run.net, run.env.device
        rows = self.live.rows(inputs["input_ids"])
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.cfg.bf16):
            embeds, head = lumped_inputs(net, inputs, rows)
            hidden = run.engine(
                inputs["input_ids"],
                image_grid_thw=inputs.get("image_grid_thw"),
                video_grid_thw=inputs.get("video_grid_thw"),
                position_ids=inputs.get("position_ids"),
                cu_seqlens=inputs.get("cu_seqlens"),
                inputs_embeds=embeds,
                logits_to_keep=keep,
                return_hidden=True,
                taps=taps,
            ).hidden
            logits = F.linear(hidden, head)
        return lumped_loss_sum(logits, targets, rows, net.cfg.text.vocab_size)

    def after_step(self, run: Run, lr: float) -> None:
        self.live.update(run.net.lm_head.weight, run.env)


def lumped_inputs(
    net: Qwen2VL, inputs: dict[str, torch.Tensor], rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input embeddings [1, T, E] with the visual features in, output rows [K, E]) of a packed
    row: the rows gathered once and, with tied weights, read by the input embedding too."""
    feats = {}
    for kind, pixels, grid in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        if inputs.get(pixels) is not None:
            feats[kind] = net.encode_visual(inputs[pixels], inputs[grid])
    ids = inputs["input_ids"]
    rows = rows.to(ids.device)
    head = net.lm_head.weight[rows]
    token_embeds = None
    if net.cfg.text.tie_word_embeddings and len(rows):
        local = torch.searchsorted(rows, ids).clamp(max=len(rows) - 1)
        if bool((rows[local] == ids).all()):
            token_embeds = F.embedding(local, head)
    return net.embed(ids, feats.get("image"), feats.get("video"), token_embeds=token_embeds), head


def zero_unused_rows(model: Qwen2VL, vocab: Collection[int]) -> Qwen2VL:
    """Zero the input and output embedding rows of every token outside `vocab` (in place)."""
    size = model.cfg.text.vocab_size
    ids = torch.tensor(sorted(vocab), dtype=torch.long)
    if len(ids) and not (0 <= int(ids[0]) and int(ids[-1]) < size):
        raise ValueError(f"vocab ids must lie in [0, {size}): got {int(ids[0])}..{int(ids[-1])}")
    unused = torch.ones(size, dtype=torch.bool)
    unused[ids] = False
    with torch.no_grad():
        model.model.embed_tokens.weight[unused] = 0.0
        model.lm_head.weight[unused] = 0.0
    return model


def data_token_ids(paths: Iterable[str | Path], processor: Processor) -> set[int]:
    """Every token id the conversations of these JSONL files hold (their text, the chat
    template's tokens, one pad id per picture or video): media are not read. ValueError names
    the file and line of a line that is not a conversation."""
    ids: set[int] = set()
    for path in paths:
        for number, obj in read_jsonl(path):
            try:
                if isinstance(obj, Exception):
                    raise obj
                messages, tools = parse_line(obj)
                rendered, _ = render_ids(
                    messages, processor.tokenizer, tools=tools, template=processor.chat_template
                )
            except (ValueError, Qwen2VLError) as e:
                raise ValueError(f"{path}:{number}: {e}") from e
            ids.update(rendered)
    return ids
