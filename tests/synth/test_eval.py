"""Eval scores replies by what they say: the right answer counts, a wrong or ambiguous one not."""

from __future__ import annotations

import json

import pytest

from qwen2vl.grounding import Box, GroundedObject, format_object
from qwen2vl.processor import load_processor
from qwen2vl.synth import ALL_TASKS, make_sample
from qwen2vl.synth.eval import SCORERS, evaluate, format_table, iou, write_answers
from qwen2vl.tokenizer import BOX_END, BOX_START, OBJECT_REF_END, OBJECT_REF_START


def drawn(task: str, n: int = 12):
    return [make_sample(task, seed=5, index=i) for i in range(n)]


@pytest.mark.parametrize("task", ALL_TASKS)
def test_the_training_answer_scores_right(task):
    for s in drawn(task):
        assert SCORERS[task](s, s.answer), (s.answer, s.target)


def test_iou():
    a = Box(0, 0, 100, 100)
    assert iou(a, a) == 1.0
    assert iou(a, Box(50, 0, 150, 100)) == pytest.approx(50 / 150)
    assert iou(a, Box(200, 200, 300, 300)) == 0.0
    assert iou(a, Box(10, 10, 10, 50)) == 0.0  # degenerate


def test_wrong_and_ambiguous_replies_score_wrong():
    shape = drawn("shape")[0]
    colour, kind = shape.target.split()
    other = "green" if colour != "green" else "red"
    assert not SCORERS["shape"](shape, f"A {other} {kind}.")
    assert not SCORERS["shape"](shape, f"A {colour} {kind} or a {other} {kind}.")
    count = drawn("count")[0]
    assert not SCORERS["count"](count, f"{count.target} or {count.target + 1}")
    assert SCORERS["count"](count, f"There are {count.target}.")
    ocr = next(s for s in drawn("ocr", 40) if str(s.target).isdigit() and len(str(s.target)) > 1)
    assert not SCORERS["ocr"](ocr, str(ocr.target)[:-1])
    assert SCORERS["ocr"](ocr, f" {ocr.target}.")
    compare = drawn("compare")[0]
    assert not SCORERS["compare"](compare, "Yes and no.")
    direction = drawn("video_direction")[0]
    assert not SCORERS["video_direction"](direction, "Left, then right.")


def test_grounding_needs_one_box_with_iou_at_least_half():
    s = drawn("grounding")[0]
    b = s.box
    width = b.x2 - b.x1
    shifted = Box(b.x1 + width // 4, b.y1, b.x2 + width // 4, b.y2)  # IoU 0.6
    far = Box(b.x1 + width, b.y1, b.x2 + width, b.y2)  # no overlap
    say = lambda *boxes: format_object(GroundedObject(s.target, list(boxes)))  # noqa: E731
    assert iou(b, shifted) >= 0.5 and SCORERS["grounding"](s, say(shifted))
    assert not SCORERS["grounding"](s, say(far))
    assert not SCORERS["grounding"](s, say(b, far))  # two boxes for one object
    assert not SCORERS["grounding"](s, s.target)  # no box at all


SPECIALS = (OBJECT_REF_START, OBJECT_REF_END, BOX_START, BOX_END)


class Oracle:
    """A stand-in pipeline whose replies are the training answers (or a fixed text), through
    the real processor and tokenizer: what `evaluate` batches, decodes and scores."""

    def __init__(self, fixed: str | None = None):
        self.processor = load_processor(None)
        self.stop_token_ids = list(self.processor.tokenizer.stop_ids)
        self.fixed = fixed
        self.queue: list = []

    def generate(self, batch, **_):
        rows = batch["input_ids"].shape[0]
        texts = [self.fixed if self.fixed is not None else s.answer for s in self.queue[:rows]]
        del self.queue[:rows]
        end = self.processor.tokenizer.stop_ids[0]
        return [self.processor.tokenizer.encode(t, allowed_special=SPECIALS) + [end] for t in texts]


def test_evaluate_scores_every_task(monkeypatch):
    oracle = Oracle()
    import qwen2vl.synth.eval as ev

    real = ev.make_sample

    def recording(task, *, seed, index):
        s = real(task, seed=seed, index=index)
        oracle.queue.append(s)
        return s

    monkeypatch.setattr(ev, "make_sample", recording)
    answers = []
    scores = evaluate(oracle, n_per_task=3, batch_size=4, answers=answers)
    assert [s.task for s in scores] == list(ALL_TASKS)
    assert all(s.total == 3 and s.correct == 3 for s in scores)
    assert len(answers) == 3 * len(ALL_TASKS) and all(a.correct for a in answers)
    table = format_table(scores)
    assert table.count("100.0 %") == len(ALL_TASKS)


def test_write_answers(tmp_path):
    s = drawn("count")[0]
    from qwen2vl.synth.eval import Answer

    write_answers([Answer(s, "7", False)], tmp_path / "a.jsonl")
    row = json.loads((tmp_path / "a.jsonl").read_text())
    assert row == {"task": "count", "question": s.question, "expected": s.answer,
                   "reply": "7", "correct": False}  # fmt: skip
