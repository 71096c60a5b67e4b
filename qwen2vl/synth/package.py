"""Packaging: the last step of the recipe (`synth/build.py`).

Reads what the recipe left in BUILD_DIR (each run's metrics.jsonl, the eval answers, the log)
and writes beside the final model: `metrics.jsonl` (all language-model steps in one sequence,
with the run each came from), `loss.png` (that curve, runs marked), `eval.md` (the eval table).
At scale 1 it then installs the model, these files and the model card (`model_card.md`, as
README.md) as the package's default model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from qwen2vl.default_model import DEFAULT_MODEL_DIR
from qwen2vl.synth.eval import TaskScore, format_table
from qwen2vl.train.metrics import plot_loss, read_metrics

RUNS = ("warmup", "stage1", "stage2", "stage3")  # the language-model runs, in order
FINAL = "stage3"
MODEL_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "tokenizer_config.json",
)
NOTES = ("train.log", "metrics.jsonl", "loss.png", "eval.md", "vision_pretrain.jsonl")
MODEL_CARD = Path(__file__).parent / "model_card.md"  # installed as the model's README.md


def combined_metrics(build: Path) -> list[dict]:
    """Every run's steps, renumbered into one sequence, each tagged with its run."""
    out, offset = [], 0
    for run in RUNS:
        records = read_metrics(build / run / "metrics.jsonl")
        for r in records:
            out.append(dict(r, run=run, step=r["step"] + offset))
        offset += records[-1]["step"] if records else 0
    return out


def eval_table(answers: Path) -> str:
    """The eval table (as `qwen2vl eval` prints it) from its answers file."""
    scores: dict[str, TaskScore] = {}
    for line in answers.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        score = scores.setdefault(row["task"], TaskScore(row["task"]))
        score.total += 1
        score.correct += bool(row["correct"])
    return format_table(list(scores.values())) + "\n"


def package(build: Path, *, install: bool) -> Path:
    final = build / FINAL
    records = combined_metrics(build)
    with open(final / "metrics.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    # a labelled line where each stage's records begin
    marks = [
        (r["step"], r["run"])
        for i, r in enumerate(records)
        if i == 0 or records[i - 1]["run"] != r["run"]
    ]
    plot_loss(records, final / "loss.png", marks=marks)
    (final / "eval.md").write_text(eval_table(build / "eval_answers.jsonl"), encoding="utf-8")
    shutil.copyfile(build / "train.log", final / "train.log")
    shutil.copyfile(build / "vision" / "vision_pretrain.jsonl", final / "vision_pretrain.jsonl")
    if not install:
        return final
    target = DEFAULT_MODEL_DIR
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for name in MODEL_FILES + NOTES:
        shutil.copyfile(final / name, target / name)
    shutil.copyfile(MODEL_CARD, target / "README.md")
    # The bundled tokenizer (5 MB) is the model's: a link keeps one copy in the repository.
    (target / "tokenizer.json").symlink_to(Path("..") / "tokenizer.json")
    return target
