"""Scoring a model on a held-out synthetic set: one accuracy per task (`qwen2vl eval`, or
`qwen2vl eval --data synth`; your own data sets are qwen2vl/eval.py's).

    scores = evaluate(pipeline, n_per_task=100, seed=EVAL_SEED)
    print(format_table(scores))

The held-out set is drawn with another seed than the training set (`EVAL_SEED`), in memory: the
images go to the processor as PIL images, which gives the same pixels as the PNG files training
read. Answers are generated greedily in left-padded batches and scored by what they say, not by
the exact wording: the named colour and shape, the number, the text read, yes or no, the
direction, and for grounding the box, a hit when its IoU with the drawn object's box is >= 0.5.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from qwen2vl.grounding import parse_grounding
from qwen2vl.metrics import IOU_HIT, iou
from qwen2vl.synth.dataset import conversation, make_sample
from qwen2vl.synth.tasks import ALL_TASKS, DIRECTIONS, Sample
from qwen2vl.synth.world import COLOURS, SHAPES

EVAL_SEED = 1_000_001  # never a training seed: the recipe trains on small seeds
MAX_NEW_TOKENS = 40  # the longest answer (a grounding box) is about 25 tokens

# What each task's row reports, in the table.
METRICS = {
    "shape": "colour + shape accuracy",
    "count": "accuracy",
    "ocr": "exact-match accuracy",
    "grounding": f"IoU >= {IOU_HIT} rate",
    "compare": "yes/no accuracy",
    "video_direction": "accuracy",
    "video_bounces": "accuracy",
}


@dataclass
class TaskScore:
    task: str
    total: int = 0
    correct: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / max(1, self.total)


@dataclass
class Answer:
    sample: Sample
    text: str  # the decoded reply, special tokens kept (grounding needs them)
    correct: bool


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _number(text: str) -> int | None:
    found = re.findall(r"\d+", text)
    return int(found[0]) if len(found) == 1 else None


def _named(text: str, vocabulary: Sequence[str]) -> list[str]:
    return [w for w in _words(text) if w in vocabulary]


def _look(text: str) -> str | None:
    colours, shapes = _named(text, tuple(COLOURS)), _named(text, SHAPES)
    return f"{colours[0]} {shapes[0]}" if len(colours) == 1 and len(shapes) == 1 else None


def _box_hit(sample: Sample, text: str) -> bool:
    boxes = [box for obj in parse_grounding(text) for box in obj.boxes]
    return len(boxes) == 1 and iou(boxes[0], sample.box) >= IOU_HIT


def _ocr(sample: Sample, text: str) -> bool:
    return text.strip().rstrip(".").strip() == str(sample.target)


def _yes_no(sample: Sample, text: str) -> bool:
    said = _named(text, ("yes", "no"))
    return said == [sample.target]


# One rule per task: is `text` a right answer to `sample`? Ambiguous replies (two colours, two
# numbers, a second box) are wrong.
SCORERS: dict[str, Callable[[Sample, str], bool]] = {
    "shape": lambda s, text: _look(text) == s.target,
    "count": lambda s, text: _number(text) == s.target,
    "ocr": _ocr,
    "grounding": _box_hit,
    "compare": _yes_no,
    "video_direction": lambda s, text: _named(text, DIRECTIONS) == [s.target],
    "video_bounces": lambda s, text: _number(text) == s.target,
}


def evaluate(
    pipeline,
    *,
    n_per_task: int = 100,
    seed: int = EVAL_SEED,
    tasks: Sequence[str] = ALL_TASKS,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    answers: list[Answer] | None = None,
) -> list[TaskScore]:
    """Scores of a `Pipeline` on `n_per_task` held-out samples of each task (greedy decoding).
    `progress(done, total)` follows the samples; `answers`, when given, collects every reply."""
    samples = [make_sample(t, seed=seed, index=i) for t in tasks for i in range(n_per_task)]
    scores = {t: TaskScore(t) for t in tasks}
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        for sample, text in zip(chunk, _replies(pipeline, chunk), strict=True):
            ok = SCORERS[sample.task](sample, text)
            scores[sample.task].total += 1
            scores[sample.task].correct += ok
            if answers is not None:
                answers.append(Answer(sample, text, ok))
        if progress is not None:
            progress(start + len(chunk), len(samples))
    return list(scores.values())


def _replies(pipeline, samples: Sequence[Sample]) -> list[str]:
    conversations = [conversation(s, answer=False) for s in samples]
    batch = pipeline.processor(conversations, add_generation_prompt=True)
    new = pipeline.generate(batch, max_new_tokens=MAX_NEW_TOKENS, temperature=0.0)
    stops = set(pipeline.stop_token_ids)
    return [
        pipeline.processor.decode([t for t in ids if t not in stops], skip_special_tokens=False)
        for ids in new
    ]


def write_answers(answers: Sequence[Answer], path: str | Path) -> None:
    """One JSON line per reply: task, question, expected answer, reply, right or not."""
    with open(path, "w", encoding="utf-8") as f:
        for a in answers:
            row = {"task": a.sample.task, "question": a.sample.question,
                   "expected": a.sample.answer, "reply": a.text, "correct": a.correct}  # fmt: skip
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def format_table(scores: Sequence[TaskScore]) -> str:
    """A Markdown table: task, metric, samples, score."""
    lines = ["| task | metric | samples | score |", "|---|---|---|---|"]
    for s in scores:
        lines.append(f"| {s.task} | {METRICS[s.task]} | {s.total} | {100 * s.accuracy:.1f} % |")
    return "\n".join(lines)
