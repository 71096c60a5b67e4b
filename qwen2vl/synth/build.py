"""Builds the default model, Qwen2-VL-Tiny-Synth, from nothing.

    qwen2vl build-default-model [BUILD_DIR] [--scale S]     (build/default_model, scale 1)
    python -m qwen2vl.synth.build [BUILD_DIR] [--scale S]   (the same)

Steps: one synthetic data set per stage -> init (only the tokens the data holds get non-zero
embedding rows) -> vision pretraining -> warm-up (the LLM and merger learn to read the frozen
ViT) -> stage 1 (ViT + merger) -> stage 2 (everything) -> stage 3 (LLM + merger) -> eval ->
package (at scale 1, installed as the package's default model). About half an hour on 2 CPU
cores; every step is seeded, and on 2 threads with the same torch a rerun gives the same weights
bit for bit. `--scale` multiplies every sample and step count (0.01 runs the chain in about a
minute). The stage configs are recipe/*.yaml; NOTES.md says why the numbers are what they are.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from qwen2vl.synth.tasks import ALL_TASKS

RECIPE = Path(__file__).parent / "recipe"  # the architecture (model/) and the stage configs
# Each stage's own data set: its seed, samples per task, and other counts for some tasks.
DATA = {
    "warmup": (100, 2000, {"grounding": 4000, "ocr": 4000, "video_direction": 1000}),
    "stage1": (101, 300, {}),
    "stage2": (102, 1000, {}),
    "stage3": (103, 2500, {"grounding": 50000, "ocr": 6500, "count": 13000, "shape": 8000,
                           "video_direction": 1000, "compare": 2000}),
}  # fmt: skip
INIT = {"seed": 0, "std": None, "embed_std": 0.125}  # std None: 1/sqrt(fan-in) per matrix
VISION = {
    "steps": 6600,
    "pool": 35000,
    "seed": 104,
    "log_every": 100,
    "task_weights": {"count": 2.0, "video_direction": 0.25, "video_bounces": 0.25},
}
STAGES = ("warmup", "stage1", "stage2", "stage3")
EVAL_SAMPLES = 200

log = logging.getLogger("qwen2vl.synth.build")


def build(out: str | Path, *, scale: float = 1.0) -> Path:
    """Run every step into `out` (its log in out/train.log); returns the final model's directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "train.log", "w")
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        return _build(out, scale)
    finally:
        root.removeHandler(handler)
        handler.close()


def _build(out: Path, scale: float) -> Path:
    t0 = time.monotonic()
    for stage, (seed, n, counts) in DATA.items():
        _step(
            f"data {stage} (seed {seed})", make_data, out / "data" / stage, seed, n, counts, scale
        )
    _step("init", make_init, out / "init", sorted((out / "data").glob("*/data.jsonl")))
    _step("pretrain-vision", pretrain, out / "init", out / "vision", scale)
    previous = out / "vision"
    for stage in STAGES:
        _step(f"train {stage}.yaml", train_stage, stage, previous, out)
        previous = out / stage
    log.info("trained in %d s", time.monotonic() - t0)
    _step("eval", evaluate, previous, out / "eval_answers.jsonl")
    from qwen2vl.synth.package import package

    return package(out, install=scale == 1.0)


def scaled(count: float, scale: float) -> int:
    return max(1, round(count * scale))


def make_data(out: Path, seed: int, n: int, counts: dict[str, int], scale: float) -> None:
    from qwen2vl.synth.dataset import generate_dataset

    n_per_task = dict.fromkeys(ALL_TASKS, scaled(n, scale))
    n_per_task.update({task: scaled(c, scale) for task, c in counts.items()})
    generate_dataset(out, n_per_task=n_per_task, seed=seed, tasks=list(ALL_TASKS))


def make_init(out: Path, data: list[Path]) -> None:
    """Random weights; the embedding rows of every token the data never holds start at zero."""
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.processor import load_processor
    from qwen2vl.synth.vocab import data_token_ids, zero_unused_rows
    from qwen2vl.train.init import init_model, save_initial

    architecture = RECIPE / "model"
    model = init_model(Qwen2VLConfig.from_file(architecture / "config.json"), **INIT)
    zero_unused_rows(model, data_token_ids(data, load_processor(architecture)))
    save_initial(model, architecture, out)


def pretrain(model: Path, out: Path, scale: float) -> None:
    from qwen2vl.synth.pretrain import PretrainConfig, pretrain_vision

    counts = {"steps": scaled(VISION["steps"], scale), "pool": scaled(VISION["pool"], scale)}
    pretrain_vision(PretrainConfig(model=str(model), output=str(out), **(VISION | counts)))


def train_stage(stage: str, model: Path, out: Path) -> None:
    from qwen2vl.train.config import load_config, read_config_file
    from qwen2vl.train.loop import train

    path = RECIPE / f"{stage}.yaml"
    options = read_config_file(path)
    objectives = stage_objectives(options.pop("objectives", {}))
    extra = {"save_dtype": "bfloat16"} if stage == STAGES[-1] else {}  # what ships
    cfg = load_config(
        None,
        **options,
        model=str(model),
        data=str(out / "data" / stage / "data.jsonl"),
        output=str(out / stage),
        **extra,
    )
    train(cfg, objectives=objectives)


def stage_objectives(spec: dict[str, dict[str, Any]]) -> list:
    """The recipe's objectives a stage config names, in the order the trainer calls them."""
    from qwen2vl.synth.box_attention import BoxAttention
    from qwen2vl.synth.box_regression import BoxRegression
    from qwen2vl.synth.vocab import LumpedVocab

    kinds = {
        "lumped_vocab": LumpedVocab,
        "box_attention": BoxAttention,
        "box_regression": BoxRegression,
    }
    unknown = set(spec) - set(kinds)
    if unknown:
        raise ValueError(f"unknown objectives {sorted(unknown)}; known: {sorted(kinds)}")
    return [kind(**(spec[name] or {})) for name, kind in kinds.items() if name in spec]


def evaluate(model: Path, answers_file: Path) -> None:
    from qwen2vl.generation.pipeline import Pipeline
    from qwen2vl.synth.eval import evaluate as run_eval
    from qwen2vl.synth.eval import format_table, write_answers

    answers: list = []
    scores = run_eval(
        Pipeline.from_pretrained(model, dtype="float32"),
        n_per_task=EVAL_SAMPLES,
        tasks=list(ALL_TASKS),
        batch_size=32,
        answers=answers,
    )
    log.info("\n%s", format_table(scores))
    write_answers(answers, answers_file)


def _step(name: str, run, *args) -> None:
    log.info("$ %s", name)
    run(*args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("build", nargs="?", default="build/default_model", help="the build directory")
    p.add_argument("--scale", type=float, default=1.0, help="multiplies every count (1 installs)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    where = build(args.build, scale=args.scale)
    log.info("packaged: %s", where)
    return 0


if __name__ == "__main__":
    from qwen2vl.cli import main

    raise SystemExit(main(["build-default-model", *sys.argv[1:]]))
