"""Packaging the recipe's output: one loss curve across the runs, the eval table from the
answers, and the notes beside the final model."""

from __future__ import annotations

import json

from PIL import Image

from qwen2vl.synth import package as package_module
from qwen2vl.synth.package import (
    FINAL,
    MODEL_CARD,
    MODEL_FILES,
    RUNS,
    combined_metrics,
    eval_table,
    package,
)


def fake_build(root):
    for k, run in enumerate(RUNS):
        (root / run).mkdir(parents=True)
        with open(root / run / "metrics.jsonl", "w") as f:
            for step in (10, 20, 30):
                f.write(json.dumps({"step": step, "loss": 5.0 / (k + 1) - step / 100}) + "\n")
    (root / "vision").mkdir()
    (root / "vision" / "vision_pretrain.jsonl").write_text('{"config": {}}\n')
    (root / "train.log").write_text("log\n")
    rows = [("shape", True), ("shape", False), ("count", True), ("ocr", False)]
    with open(root / "eval_answers.jsonl", "w") as f:
        for task, right in rows:
            f.write(json.dumps({"task": task, "reply": "x", "correct": right}) + "\n")


def test_runs_are_renumbered_into_one_sequence(tmp_path):
    fake_build(tmp_path)
    records = combined_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(10, 121, 10))
    assert [r["run"] for r in records[::3]] == list(RUNS)


def test_eval_table_scores_each_task(tmp_path):
    fake_build(tmp_path)
    table = eval_table(tmp_path / "eval_answers.jsonl")
    assert "| shape | colour + shape accuracy | 2 | 50.0 % |" in table
    assert "| count | accuracy | 1 | 100.0 % |" in table
    assert "| ocr | exact-match accuracy | 1 | 0.0 % |" in table


def test_package_writes_the_notes_beside_the_final_model(tmp_path):
    fake_build(tmp_path)
    final = package(tmp_path, install=False)
    assert final == tmp_path / FINAL
    assert len((final / "metrics.jsonl").read_text().splitlines()) == 12
    assert Image.open(final / "loss.png").size == (800, 450)
    assert (final / "eval.md").read_text().startswith("| task |")
    assert (final / "train.log").read_text() == "log\n"
    assert (final / "vision_pretrain.jsonl").is_file()


def test_install_copies_the_model_card_as_readme(tmp_path, monkeypatch):
    fake_build(tmp_path / "build")
    for name in MODEL_FILES:
        (tmp_path / "build" / FINAL / name).write_text(name)
    target = tmp_path / "assets" / "Tiny"
    monkeypatch.setattr(package_module, "DEFAULT_MODEL_DIR", target)  # not the real assets
    assert package(tmp_path / "build", install=True) == target
    assert (target / "README.md").read_text() == MODEL_CARD.read_text()
    assert (target / "config.json").read_text() == "config.json"
