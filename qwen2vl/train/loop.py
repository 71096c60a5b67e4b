"""The training loop: data, stage, LoRA, packing, AdamW, checkpoints, one or many processes.

    result = train(TrainConfig(model="ckpt", data="train.jsonl", output="out", stage=3))

One optimizer step reads G = processes * grad_accum packed rows (see packing.PackSchedule). Each
row's summed token loss is divided by the number of target tokens of the whole step (known from
the validation pass, so no communication is needed) and multiplied by the process count, which
DDP / FSDP2 averaging undoes: the gradient is that of the step's token-mean loss whatever the
split over rows, micro-batches and processes.

Randomness (LoRA dropout) is seeded per packed row from (seed, epoch, row), so a resumed run, or
one on another number of processes, draws the same numbers for the same row: restoring the data
position restores the random stream.

Anything beyond the next-token loss (auxiliary losses, another way to score the vocabulary)
plugs in as an `Objective` (objective.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen2vl.errors import CheckpointError, ConfigError
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.model.text import DecoderTaps
from qwen2vl.processor import load_processor
from qwen2vl.train import checkpoint as ckpt
from qwen2vl.train import distributed as D
from qwen2vl.train.config import TrainConfig
from qwen2vl.train.data import (
    ConversationData,
    DataError,
    DataReport,
    TrainData,
    format_problems,
    merge_reports,
    processor_with,
    validate_file,
)
from qwen2vl.train.metrics import MetricsLog, Progress, plot_loss, read_metrics
from qwen2vl.train.objective import Objective, Run
from qwen2vl.train.optim import build_optimizer, lr_at, set_lr
from qwen2vl.train.packing import (
    PackSchedule,
    collate,
    loss_sum,
    packing_efficiency,
    target_positions,
)
from qwen2vl.train.stages import TrainableReport, configure_trainable
from qwen2vl.weights import load_model

log = logging.getLogger("qwen2vl.train")


@dataclass
class TrainResult:
    output: Path
    steps: int  # optimizer steps done in total (the resumed ones included)
    losses: list[float] = field(default_factory=list)  # of the steps run by this call
    packing_efficiency: float = 0.0  # of the first epoch's rows
    trainable: TrainableReport | None = None


def validate(cfg: TrainConfig, env: D.DistEnv | None = None) -> tuple[ConversationData, DataReport]:
    """Check every line of cfg.data (split over the processes); DataError on bad lines unless
    cfg.on_bad_line == "skip"."""
    env = env or D.DistEnv()
    processor = processor_with(load_processor(cfg.model or None), cfg.max_pixels)
    shard = validate_file(
        cfg.data,
        processor,
        max_tokens=cfg.max_tokens,
        too_long=cfg.too_long,
        shard=(env.rank, env.world),
    )
    report = merge_reports(D.all_gather_objects(shard, env))
    if env.main:
        log.info("%s", report.summary(cfg.data))
    if report.problems:
        text = format_problems(cfg.data, report.problems)
        if cfg.on_bad_line == "stop":
            raise DataError(
                f"{len(report.problems)} bad lines (on_bad_line=skip trains without them):\n{text}"
            )
        if env.main:
            log.warning("skipping %d bad lines:\n%s", len(report.problems), text)
    if not report.records:
        raise DataError(f"{cfg.data}: no usable samples")
    return ConversationData(report.records, processor), report


def train(
    cfg: TrainConfig,
    *,
    model: Qwen2VL | None = None,
    data: TrainData | None = None,
    objectives: Sequence[Objective] = (),
) -> TrainResult:
    """Run (or resume) a training run. `model` / `data` replace loading cfg.model / cfg.data
    (a given model must hold the same frozen weights when a run is resumed); `objectives` add
    to what is optimised (objective.py)."""
    env = D.setup(cfg.device)
    try:
        if cfg.validate_only:
            validate(cfg, env)
            return TrainResult(Path(cfg.output), 0)
        return Trainer(cfg, env, model=model, data=data, objectives=objectives).run()
    finally:
        D.teardown(env)


class Trainer:
    def __init__(self, cfg: TrainConfig, env: D.DistEnv, *, model=None, data=None, objectives=()):
        if not cfg.output or (model is None and not cfg.model) or (data is None and not cfg.data):
            raise ConfigError("train: output, and model and data (paths or objects), are needed")
        self.cfg, self.env, self.out = cfg, env, Path(cfg.output)
        self.objectives = list(objectives)
        if env.main:
            self.out.mkdir(parents=True, exist_ok=True)
            ckpt.clean_partial(self.out)
        D.barrier(env)
        self.data = data if data is not None else validate(cfg, env)[0]
        resume = self._find_resume()
        self.net = self._build_model(model)
        self.rows_per_step, self.accum = self._step_shape(resume)
        if resume is not None:
            self._load_trainable(resume)
        self.run_info = Run(cfg, env, self.net, self.data)
        for objective in self.objectives:
            objective.prepare(self.run_info)
        self.engine = self.run_info.engine = D.wrap(self.net, env, cfg.strategy)
        self.optimizer = build_optimizer(
            self.engine, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.adam_betas
        )
        if resume is not None:
            D.load_optimizer_state(self.engine, self.optimizer, resume.optimizer, env)
        self.start = resume.state["step"] if resume is not None else 0
        self.schedule = PackSchedule(
            self.data.info,
            capacity=cfg.max_tokens,
            rows_per_step=self.rows_per_step,
            seed=cfg.seed,
            epochs=cfg.epochs,
            max_steps=cfg.max_steps,
        )

    # -- setup ----------------------------------------------------------------------------------

    def _build_model(self, model: Qwen2VL | None) -> Qwen2VL:
        cfg = self.cfg
        net = model if model is not None else load_model(cfg.model, dtype="float32")
        net = net.to(device=self.env.device, dtype=torch.float32)
        torch.manual_seed(cfg.seed)  # LoRA's initial A
        self.trainable = configure_trainable(
            net,
            stage=cfg.stage,
            freeze=cfg.freeze,
            lora=cfg.lora,
            lora_targets=cfg.lora_targets,
            lora_rank=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
        )
        net.model.gradient_checkpointing = cfg.gradient_checkpointing
        net.visual.gradient_checkpointing = cfg.gradient_checkpointing
        if self.env.main:
            log.info("stage %d: %s", cfg.stage, self.trainable.summary())
        return net.train()

    def _find_resume(self) -> ckpt.Checkpoint | None:
        if not self.cfg.resume:
            return None
        path = ckpt.latest_checkpoint(self.out) if self.cfg.resume == "auto" else self.cfg.resume
        if path is None:
            if self.env.main:
                log.info("resume=auto: no checkpoint in %s yet, starting fresh", self.out)
            return None
        loaded = ckpt.load_checkpoint(path)
        if self.env.main:
            log.info("resuming from %s (step %d)", path, loaded.state["step"])
            self._warn_if_changed(loaded.state)
        return loaded

    def _warn_if_changed(self, saved: dict[str, Any]) -> None:
        """The data position is a step number: it means the same rows only for the same data."""
        info = self.data.info
        now = (len(info), sum(i.tokens for i in info))
        if (saved["samples"], saved["sample_tokens"]) != now:
            log.warning(
                "resume: the data changed since the checkpoint (%d samples / %d tokens, now "
                "%d / %d); the run continues at step %d of the new data's schedule",
                saved["samples"], saved["sample_tokens"], *now, saved["step"],
            )  # fmt: skip
        source = saved["config"].get("model")
        if source and self.cfg.model and Path(source).resolve() != Path(self.cfg.model).resolve():
            log.warning(
                "resume: the checkpoint was trained from %s, not %s; frozen weights come from "
                "the latter", source, self.cfg.model,
            )  # fmt: skip

    def _step_shape(self, resume: ckpt.Checkpoint | None) -> tuple[int, int]:
        """(rows per optimizer step, micro-batches per process); a resumed run keeps the saved
        rows per step, changing grad_accum when the process count changed."""
        rows = self.env.world * self.cfg.grad_accum
        if resume is None or resume.state["rows_per_step"] == rows:
            return rows, self.cfg.grad_accum
        saved = resume.state["rows_per_step"]
        if saved % self.env.world:
            raise ConfigError(
                f"the checkpoint's steps read {saved} rows; {self.env.world} processes cannot "
                "split that evenly (use a process count dividing it)"
            )
        if self.env.main:
            log.info("resume: grad_accum %d keeps %d rows per step", saved // self.env.world, saved)
        return saved, saved // self.env.world

    def _load_trainable(self, resume: ckpt.Checkpoint) -> None:
        want, have = set(self.trainable.trainable), set(resume.trainable)
        if want != have:
            raise CheckpointError(
                f"{resume.path} trained other parameters than this config ({len(have - want)} "
                f"only there, {len(want - have)} only here): stage, freeze or LoRA differ"
            )
        tensors = {k: v.to(self.env.device) for k, v in resume.trainable.items()}
        self.net.load_state_dict(tensors, strict=False)

    # -- the loop -------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, env, total = self.cfg, self.env, self.schedule.total
        efficiency = packing_efficiency(self.data.info, self.schedule.plan(0), cfg.max_tokens)
        if env.main:
            rows = len(self.schedule.plan(0))
            log.info(
                "%d samples -> %d packed rows of <= %d tokens (packing efficiency %.1f%%); "
                "%d rows per step, %d steps",
                len(self.data.info),
                rows,
                cfg.max_tokens,
                100 * efficiency,
                self.rows_per_step,
                total,
            )
        metrics = (
            MetricsLog(self.out / "metrics.jsonl", resume_step=self.start) if env.main else None
        )
        progress = Progress(total, self.start, every=cfg.log_every) if env.main else None
        losses = []
        for step in range(self.start, total):
            record = self.step(step)
            losses.append(record["loss"])
            if env.main:
                metrics.write(record)
                progress.update(step + 1, record["loss"], record["tokens"])
            if cfg.save_every and (step + 1) % cfg.save_every == 0:
                self.save_checkpoint(step + 1, record)
        self.save_final()
        return TrainResult(self.out, max(total, self.start), losses, efficiency, self.trainable)

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step over the step's rows; returns its metrics record."""
        cfg, env, t0 = self.cfg, self.env, time.monotonic()
        epoch, first, rows = self.schedule.rows(step)
        info = self.data.info
        targets = sum(info[i].targets for row in rows for i in row)
        total = 0.0
        for m in range(self.accum):
            j = m * env.world + env.rank  # interleaved, so a short last step spreads over ranks
            row = rows[j] if j < len(rows) else []  # none left: the dummy row, for collectives
            total += self._micro(row, epoch, first + j, targets, sync=m == self.accum - 1)
        params = [p for p in self.engine.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"))
        lr = lr_at(
            step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps, total=self.schedule.total
        )
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for objective in self.objectives:
            objective.after_step(self.run_info, lr)
        (total,) = D.all_reduce_sum([total], env)
        tokens = sum(info[i].tokens for row in rows for i in row)
        seconds = time.monotonic() - t0
        extra = {}
        for objective in self.objectives:
            extra |= objective.metrics(self.run_info)
        return extra | {
            "step": step + 1,
            "epoch": epoch,
            "loss": total / max(targets, 1),
            "lr": lr,
            "grad_norm": D.to_float(norm),
            "tokens": tokens,
            "targets": targets,
            "samples": sum(len(row) for row in rows),
            "tokens_per_s": tokens / max(seconds, 1e-9),
            "time": time.time(),
        }

    def _micro(self, row: list[int], epoch: int, index: int, targets: int, *, sync: bool) -> float:
        """Forward and backward of one packed row; returns its summed token loss."""
        batch = collate([self.data[i] for i in row], self.net.cfg)
        for objective in self.objectives:
            objective.look(batch)
        torch.manual_seed(_row_seed(self.cfg.seed, epoch, index))
        with D.gradient_sync(self.engine, sync):
            keep = target_positions(batch.targets)
            inputs = batch.model_inputs(self.env.device)
            taps = DecoderTaps()
            for objective in self.objectives:
                objective.tap(taps)
            loss = self._token_loss(inputs, keep, batch.targets[keep], taps)
            total = loss
            for objective in self.objectives:
                extra = objective.loss()
                if extra is not None:
                    total = total + extra
            (total * self.env.world / max(targets, 1)).backward()
        return float(loss.detach())

    def _token_loss(self, inputs, keep, targets, taps) -> torch.Tensor:
        """Summed next-token loss at positions `keep`: an objective's way, else every row's."""
        for objective in self.objectives:
            loss = objective.token_loss(self.run_info, inputs, keep, targets, taps)
            if loss is not None:
                return loss
        device = self.env.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            logits = self.engine(**inputs, logits_to_keep=keep, taps=taps).logits
        return loss_sum(logits, targets)

    # -- saving ---------------------------------------------------------------------------------

    def save_checkpoint(self, step: int, record: dict[str, Any]) -> None:
        """All ranks gather; rank 0 writes OUT/checkpoint-STEP atomically."""
        state = D.full_model_state(self.engine, self.env)
        optim = D.full_optimizer_state(self.engine, self.optimizer, self.env)
        if self.env.main:
            epoch, _ = self.schedule.locate(step - 1)
            path = ckpt.save_checkpoint(
                self.out / f"checkpoint-{step}",
                cfg=self.net.cfg,
                model_state=state,
                trainable=self.trainable.trainable,
                optimizer_state=optim,
                trainer_state=self._trainer_state(step, epoch, record),
                source=self.cfg.model or None,
                dtype=self.cfg.save_dtype,
                lora_scaling=self._lora_scaling(),
            )
            if self.cfg.keep_checkpoints:
                ckpt.prune_checkpoints(self.out, self.cfg.keep_checkpoints)
            plot_loss(read_metrics(self.out / "metrics.jsonl"), self.out / "loss.png")
            log.info("saved %s", path)
        D.barrier(self.env)

    def save_final(self) -> None:
        """The trained model, LoRA merged, in OUT itself; the loss curve beside it."""
        state = D.full_model_state(self.engine, self.env)
        if self.env.main:
            ckpt.write_model(
                self.out,
                self.net.cfg,
                state,
                source=self.cfg.model or None,
                dtype=self.cfg.save_dtype,
                lora_scaling=self._lora_scaling(),
            )
            plot_loss(read_metrics(self.out / "metrics.jsonl"), self.out / "loss.png")
            log.info("saved the model to %s", self.out)
        D.barrier(self.env)

    def _lora_scaling(self) -> float | None:
        return self.cfg.lora_alpha / self.cfg.lora_rank if self.cfg.lora else None

    def _trainer_state(self, step: int, epoch: int, record: dict[str, Any]) -> dict[str, Any]:
        info = self.data.info
        return {
            "step": step,
            "epoch": epoch,
            "total_steps": self.schedule.total,
            "rows_per_step": self.rows_per_step,
            "world_size": self.env.world,
            "grad_accum": self.accum,
            "samples": len(info),
            "sample_tokens": sum(i.tokens for i in info),
            "loss": record["loss"],
            "config": self.cfg.to_dict(),
        }


def _row_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2**63)
