"""The default model's recipe runs end to end (at 1 % scale), reproducibly, and leaves the
installed model alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import qwen2vl
from qwen2vl.default_model import DEFAULT_MODEL_DIR
from qwen2vl.synth import ALL_TASKS

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_recipe_runs_every_step_at_small_scale(tmp_path):
    installed = (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_mtime_ns
    env = dict(os.environ, QWEN2VL_RECIPE_SCALE="0.01", PYTHON=sys.executable)
    for build in (tmp_path / "build", tmp_path / "again"):
        subprocess.run(
            ["bash", str(ROOT / "scripts/train_default_model.sh"), str(build)],
            env=env, check=True, timeout=900, capture_output=True,
        )  # fmt: skip
    # every step is seeded: a rerun writes the same weights, byte for byte
    for step in ("vision", "warmup", "stage2", "stage3"):
        weights = f"{step}/model.safetensors"
        assert (build / weights).read_bytes() == (tmp_path / "build" / weights).read_bytes(), step
    final = build / "stage3"
    model = qwen2vl.load_model(final)
    assert next(model.parameters()).dtype.is_floating_point
    table = (final / "eval.md").read_text()
    assert all(f"| {task} |" in table for task in ALL_TASKS)
    log = (final / "train.log").read_text()
    for step in ("pretrain-vision", "warmup.yaml", "stage1.yaml", "stage2.yaml", "stage3.yaml"):
        assert step in log, step
    runs = {line.split('"run": "')[1].split('"')[0] for line in open(final / "metrics.jsonl")}
    assert runs == {"warmup", "stage1", "stage2", "stage3"}
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_mtime_ns == installed
