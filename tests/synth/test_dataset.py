"""The synthetic data set on disk: deterministic, and readable by the processor and trainer."""

from __future__ import annotations

import json

import pytest

import qwen2vl
from qwen2vl.cli import main
from qwen2vl.grounding import parse_grounding
from qwen2vl.synth import ALL_TASKS, generate_dataset
from qwen2vl.train.data import resolve_media, validate_file


@pytest.fixture(scope="module")
def processor():
    return qwen2vl.load_processor()


def files(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_writes_identical_files_and_another_seed_does_not(tmp_path):
    a = generate_dataset(tmp_path / "a", n_per_task=2, seed=3)
    b = generate_dataset(tmp_path / "b", n_per_task=2, seed=3)
    c = generate_dataset(tmp_path / "c", n_per_task=2, seed=4)
    assert files(a.parent) == files(b.parent)
    assert a.read_bytes() != c.read_bytes()
    assert [x["answer"] for x in lines(a)] != [x["answer"] for x in lines(c)]


def test_more_samples_only_append_to_each_task(tmp_path):
    small = generate_dataset(tmp_path / "s", n_per_task={"count": 2, "ocr": 1}, seed=0)
    big = generate_dataset(tmp_path / "b", n_per_task={"count": 3, "ocr": 1}, seed=0)
    assert [x["task"] for x in lines(small)] == ["count", "count", "ocr"]
    assert lines(big)[:2] == lines(small)[:2] and lines(big)[3] == lines(small)[2]


def test_unknown_task_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic tasks"):
        generate_dataset(tmp_path, n_per_task={"colour": 1}, seed=0)


def test_every_task_batches_and_passes_training_validation(tmp_path, processor):
    path = generate_dataset(tmp_path, n_per_task=2, seed=1)
    objs = lines(path)
    assert [o["task"] for o in objs] == [t for t in ALL_TASKS for _ in range(2)]
    for obj in objs:
        batch = processor(resolve_media(obj["messages"], path.parent))
        visual = "pixel_values_videos" if obj["task"].startswith("video") else "pixel_values"
        assert batch["input_ids"].shape[0] == 1 and batch[visual].shape[0] > 0
        assert obj["messages"][-1] == {"role": "assistant", "content": obj["answer"]}
    report = validate_file(path, processor, max_tokens=4096)
    assert report.problems == [] and report.notes == []
    assert len(report.records) == report.lines == len(objs)


def test_grounding_lines_store_the_box_their_answer_holds(tmp_path, processor):
    path = generate_dataset(tmp_path, n_per_task={"grounding": 5}, seed=2, tasks=["grounding"])
    box_start = processor.tokenizer.special_id("<|box_start|>")
    for obj in lines(path):
        (found,) = parse_grounding(obj["answer"])
        b = found.boxes[0]
        assert [b.x1, b.y1, b.x2, b.y2] == obj["box"] and found.label == obj["target"]
        assert all(0 <= v < 1000 for v in obj["box"])
        batch = processor(resolve_media(obj["messages"], path.parent))
        assert (batch["input_ids"] == box_start).sum() == 1  # a special token, not text


def test_module_entry_point_prints_a_count_per_task(tmp_path, capsys):
    main(
        [
            "synth-data",
            "--out",
            str(tmp_path),
            "--seed",
            "5",
            "--n",
            "1",
            "--tasks",
            "shape",
            "count",
        ]
    )
    out = capsys.readouterr().out.split("\n")
    assert out[0].split() == ["shape", "1"] and out[1].split() == ["count", "1"]
    assert (tmp_path / "data.jsonl").is_file()


def test_module_entry_point_takes_another_count_for_a_task(tmp_path, capsys):
    main(["synth-data", "--out", str(tmp_path), "--n", "1", "--tasks", "shape", "count",
          "--n-task", "count=2"])  # fmt: skip
    out = capsys.readouterr().out.split("\n")
    assert out[0].split() == ["shape", "1"] and out[1].split() == ["count", "2"]
    for bad in ("ocr=2", "count", "count=x"):  # a task not asked for, no count, not a count
        argv = ["synth-data", "--out", str(tmp_path), "--tasks", "shape", "count", "--n-task", bad]
        assert main(argv) == 2
