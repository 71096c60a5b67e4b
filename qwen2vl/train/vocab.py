"""Lumped zero rows: a model trained from nothing on a small vocabulary pays for the tokens it uses.

    qwen2vl init ARCH --output DIR --vocab-data train.jsonl    (unused tokens' rows start at 0)
    qwen2vl train ... --lump-zero-rows

The default model uses a few hundred of Qwen2's 151,936 tokens, yet a full-vocabulary loss pays
for all of them: the [targets, V] logits, their softmax and the gradient through them were about
two thirds of a training step of the 64-wide model (a 2,048-token step: 0.69 s with every row
scored, 0.30 s lumped, measured on 2 cores). A row of the output embedding that
is exactly zero gives every position the logit 0, so with Z such rows

    logsumexp(all logits) = logsumexp(logits of the other rows, log Z)

and the loss needs the logits of the rows that are not zero (or whose token is in the batch) and
one shared column. The loss is the full-vocabulary loss, exactly; the one difference from full
training is that a zero row stays zero until its token occurs in a batch (a full softmax would
push it slightly negative).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from qwen2vl.chat import render_ids
from qwen2vl.errors import Qwen2VLError
from qwen2vl.processor import Processor
from qwen2vl.train.data import parse_line, read_jsonl
from qwen2vl.train.distributed import DistEnv, all_reduce_any


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
