"""The embedded default model: a real checkpoint in the official layout, small enough to ship,
read by transformers with the same greedy answers as ours, and driven by `qwen2vl demo`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen2vl import cli
from qwen2vl.default_model import DEFAULT_MODEL_DIR, default_model_dir, model_or_default
from qwen2vl.errors import CheckpointError
from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.synth import make_sample
from qwen2vl.synth.dataset import conversation
from qwen2vl.synth.eval import EVAL_SEED

RECIPE = Path(__file__).parents[1] / "qwen2vl/synth/recipe/model"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(default_model_dir(), dtype="float32")


def test_shipped_checkpoint_is_the_recipes_architecture_and_small():
    path = default_model_dir()
    assert model_or_default(None) == path
    ours = json.loads((path / "config.json").read_text())
    recipe = json.loads((RECIPE / "config.json").read_text())
    for key in ("hidden_size", "num_hidden_layers", "vocab_size", "vision_config"):
        assert ours.get(key) == recipe.get(key), key
    size = sum(f.stat().st_size for f in path.iterdir() if not f.is_symlink())
    assert size <= 25 * 2**20
    for name in ("loss.png", "train.log", "eval.md", "metrics.jsonl", "tokenizer.json"):
        assert (path / name).is_file(), name
    assert Image.open(path / "loss.png").size[0] > 0


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr("qwen2vl.default_model.DEFAULT_MODEL_DIR", tmp_path / "gone")
    with pytest.raises(CheckpointError, match="--model"):
        default_model_dir()
    assert model_or_default(str(tmp_path)) == tmp_path  # a directory given is used as it is
    with pytest.raises(CheckpointError, match="neither a directory"):
        model_or_default(str(tmp_path / "elsewhere"))


def test_transformers_reads_it_and_answers_as_we_do(pipe):
    transformers = pytest.importorskip("transformers")
    from tiny import reference

    theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(
        DEFAULT_MODEL_DIR, dtype=torch.float32
    ).eval()
    convs = [
        conversation(make_sample(task, seed=EVAL_SEED, index=3), answer=False)
        for task in ("shape", "grounding", "compare", "video_direction")
    ]
    for conv in convs:  # one at a time: each its own prompt, no padding
        batch = pipe.processor([conv], add_generation_prompt=True)
        ours = pipe.generate(batch, max_new_tokens=24)
        assert ours == reference(theirs, batch, 24)
        assert len(ours[0]) > 1


def test_demo_runs_on_the_default_model(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(DEFAULT_MODEL_DIR) in out and "right in" in out
    picture = Image.open(tmp_path / "grounding.png")
    assert picture.size[0] >= 224
    assert (tmp_path / "video_direction.gif").is_file()


def test_eval_scores_the_default_model_per_task(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    assert cli.main(["eval", "--n", "3", "--answers", str(answers)]) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert len(rows) == 3 * 7
    for task in {r["task"] for r in rows}:
        right = sum(r["correct"] for r in rows if r["task"] == task)
        assert f"| {task} |" in out and f"| 3 | {100 * right / 3:.1f} % |" in out


def test_chat_without_model_answers_with_the_default(tmp_path):
    import subprocess
    import sys

    picture = tmp_path / "shape.png"
    sample = make_sample("shape", seed=EVAL_SEED, index=0)
    sample.images[0].save(picture)
    run = subprocess.run(
        [sys.executable, "-m", "qwen2vl.cli", "chat", "--image", str(picture),
         "--max-new-tokens", "8", sample.question],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("A ")  # the form it was trained to answer in
