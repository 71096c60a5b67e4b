"""Eval on a user's data file: the reference is split off each line, the rest is generated through
the batch path and scored; the per-sample rows and the summary agree; the command wires it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen2vl.cli import main
from qwen2vl.default_model import DEFAULT_MODEL_DIR
from qwen2vl.eval import evaluate_file, format_table, split_reference
from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.metrics import box_iou
from qwen2vl.run import make_engine
from qwen2vl.synth import make_sample
from qwen2vl.synth.dataset import conversation


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_the_last_assistant_turn_is_the_reference():
    body = {"id": "q", "messages": [user("Colour?"), {"role": "assistant", "content": "red"}]}
    request, refs = split_reference(body)
    assert refs == ["red"] and request["messages"] == [user("Colour?")] and request["id"] == "q"
    parts = [{"type": "text", "text": "dark "}, {"type": "text", "text": "red"}]
    assert split_reference([user("?"), {"role": "assistant", "content": parts}])[1] == ["dark red"]


def test_answers_beside_the_conversation_are_the_references():
    request, refs = split_reference({"messages": [user("How many?")], "answers": ["2", "two"]})
    assert refs == ["2", "two"] and request["messages"] == [user("How many?")]
    assert split_reference({"messages": [user("?")], "answers": "B"})[1] == ["B"]
    with_turn = {"messages": [user("?"), {"role": "assistant", "content": "x"}], "answers": ["y"]}
    request, refs = split_reference(with_turn)
    assert refs == ["y"] and len(request["messages"]) == 1  # the turn is not sent either


@pytest.mark.parametrize(
    "body, match",
    [
        ({"messages": [user("?")]}, "no reference"),
        ({"messages": [user("?")], "answers": []}, "non-empty list"),
        ({"messages": [user("?")], "answers": [3]}, "list of strings"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "no question"),
    ],
)
def test_a_line_without_a_usable_reference_is_refused(body, match):
    with pytest.raises(ValueError, match=match):
        split_reference(body)


@pytest.fixture(scope="module")
def engine():
    pipe = Pipeline.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32")
    return make_engine(pipe.model, pipe.processor, stop_token_ids=pipe.stop_token_ids)


def synth_file(root: Path, task: str, n: int) -> Path:
    """n samples of a synthetic task as an eval file (the training answer as the reference),
    plus a line whose image is missing."""
    lines = []
    for i in range(n):
        s = make_sample(task, seed=3, index=i)
        names = [f"{task}{i}_{j}.png" for j in range(len(s.images))]
        for name, image in zip(names, s.images, strict=True):
            image.save(root / name)
        lines.append({"id": f"{task}{i}", "messages": conversation(s, images=names)})
    gone = [{"type": "image", "image": "gone.png"}, {"type": "text", "text": "What?"}]
    lines.append({"id": "gone", "messages": [user("x") | {"content": gone}], "answers": ["x"]})
    path = root / f"{task}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_scores_are_the_mean_of_the_rows_and_errors_are_not_scored(engine, tmp_path):
    data = synth_file(tmp_path, "shape", 6)
    results = tmp_path / "results.jsonl"
    scores = evaluate_file(engine, data, "exact", max_tokens=16, results=results)
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"shape{i}" for i in range(6)] + ["gone"]  # file order
    assert rows[-1]["error"]["code"] == "media_error"
    assert scores.samples == 6 and scores.errors == 1
    assert scores.score == pytest.approx(sum(r["score"] for r in rows[:-1]) / 6)
    assert scores.score > 0.5  # the default model knows its shapes
    assert "| exact match | 6 | 1 |" in format_table([scores])


def test_iou_keeps_the_box_markup_of_the_replies(engine, tmp_path):
    data = synth_file(tmp_path, "grounding", 4)
    results = tmp_path / "results.jsonl"
    scores = evaluate_file(engine, data, "iou", max_tokens=40, results=results)
    rows = [json.loads(line) for line in results.read_text().splitlines()][:-1]
    assert all("<|box_start|>" in r["reply"] for r in rows)
    assert [r["iou"] for r in rows] == [
        round(box_iou(r["reply"], r["references"]), 4) for r in rows
    ]
    assert scores.samples == 4 and scores.score > 0


def test_eval_command_scores_a_data_file(tmp_path, capsys):
    data = synth_file(tmp_path, "count", 3)
    out = tmp_path / "rows.jsonl"
    args = ["eval", "--data", str(data), "--metric", "vqa", "--max-tokens", "12"]
    assert main([*args, "--answers", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| VQA accuracy | 3 | 1 |" in printed and str(out) in printed
    assert len(out.read_text().splitlines()) == 4
    assert main(args) == 0  # the default place: beside the data
    assert (tmp_path / "count.vqa.jsonl").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "FILE"], "needs --metric"),
        (["--metric", "vqa"], "--metric scores a data file"),
        (["--data", "/no/such.jsonl", "--metric", "vqa"], "no such data file"),
    ],
)
def test_eval_refuses_before_loading(args, message, tmp_path, capsys, no_weights):
    (tmp_path / "d.jsonl").write_text("{}\n")
    args = [str(tmp_path / "d.jsonl") if a == "FILE" else a for a in args]
    assert main(["eval", *args]) == 2
    assert message in capsys.readouterr().err


def test_synth_is_one_more_data_set_of_eval(capsys):
    assert main(["eval", "--data", "synth", "--n", "2", "--tasks", "shape", "count"]) == 0
    printed = capsys.readouterr().out
    assert "| shape |" in printed and "| count |" in printed
