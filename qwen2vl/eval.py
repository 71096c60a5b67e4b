"""Scoring a model on your own data: a JSONL file of conversations with their reference answers.

    qwen2vl eval --data FILE.jsonl --metric exact|vqa|anls|iou|choice [--model M] [--answers OUT]
    scores = evaluate_file(engine, "FILE.jsonl", "vqa")

A line is a line of the training data (qwen2vl/train/data.py) with its reference beside it:

    {"id": "q1", "messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"},
                                                        {"type": "text", "text": "Colour?"}]},
                              {"role": "assistant", "content": "red"}]}
    {"id": "q2", "messages": [<user turn>], "answers": ["2", "2", "two", "3", ...]}
    {"id": "q3", "messages": [<user turn>], "answers": "B", "options": ["cat", "dog", "cow"]}

A last assistant turn is the reference and is not sent. "answers" (a string or a list), when
present, are the references instead: VQA's ten human answers, DocVQA's accepted spellings.
"options" (texts in letter order, or {"A": text, ...}) lets `choice` accept a reply that is an
option's text. Request settings may be set per line as in `qwen2vl run` (max_tokens, ...).
Generation is greedy, batched continuously through the same path as `qwen2vl run`.

Metrics (qwen2vl/metrics.py, one score in [0, 1] per sample, the data set's is their mean):
    exact   the reply equals a reference, whitespace and case aside
    vqa     VQA accuracy, the official answer normalisation, min(#refs said / 3, 1) averaged
            over leave-one-out subsets
    anls    DocVQA's ANLS: 1 - normalised edit distance to the closest reference, 0 below 0.5
    iou     a hit when the reply's first box has IoU >= 0.5 with a reference box, the numbers
            compared as written: references must be in the model's own frame (Qwen2-VL 0..1000;
            Qwen2.5-VL pixels of the resized image), markup, `(x1,y1),(x2,y2)` or bbox_2d JSON
    choice  the option letter of the reply ("The answer is (B)", "b) cat") equals the reference's

Samples that could not run (a bad line, a missing image) are listed as errors, not scored.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen2vl import metrics
from qwen2vl.errors import Qwen2VLError
from qwen2vl.run import Line, Progress, Settings, answers, error, lines_of
from qwen2vl.serve.engine import Engine
from qwen2vl.train.data import parse_line, read_jsonl

METRICS: dict[str, str] = {
    "exact": "exact match",
    "vqa": "VQA accuracy",
    "anls": "ANLS",
    "iou": f"IoU >= {metrics.IOU_HIT} rate",
    "choice": "choice accuracy",
}


@dataclass
class Scores:
    data: str
    metric: str
    samples: int = 0  # scored
    errors: int = 0
    total: float = 0.0

    @property
    def score(self) -> float:
        return self.total / max(1, self.samples)


def score(metric: str, reply: str, references: list[str], options: Any = None) -> float:
    if metric == "choice":
        return metrics.choice_accuracy(reply, references, options)
    scorer = {
        "exact": metrics.exact_match,
        "vqa": metrics.vqa_accuracy,
        "anls": metrics.anls,
        "iou": metrics.box_hit,
    }[metric]
    return scorer(reply, references)


# ---- the data ---------------------------------------------------------------------------------


def split_reference(body: Any) -> tuple[dict[str, Any], list[str]]:
    """The request to send (the line without its last assistant turn) and the references."""
    messages, _ = parse_line(body)
    request = dict(body) if isinstance(body, dict) else {"messages": body}
    references = request.get("answers")
    last = messages[-1] if messages else None
    if isinstance(last, dict) and last.get("role") == "assistant":
        messages = messages[:-1]
        if references is None:
            references = _text(last.get("content"))
    if references is None:
        raise ValueError('no reference: end the conversation with the answer, or give "answers"')
    if isinstance(references, str):
        references = [references]
    if not references or not all(isinstance(r, str) for r in references):
        raise ValueError('"answers" must be a string or a non-empty list of strings')
    if not messages:
        raise ValueError("no question: the conversation holds only the reference")
    request["messages"] = messages
    return request, references


def _text(content: Any) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return None


@dataclass
class _Sample:
    references: list[str]
    options: Any


def _requests(path: Path, metric: str, samples: dict[int, _Sample]) -> Iterator[Line]:
    """The file's lines as requests (references moved into ``samples``, by line index)."""
    for line in lines_of(read_jsonl(path)):
        if line.error is None:
            try:
                request, references = split_reference(line.body)
            except ValueError as e:
                line.error = error("invalid_reference", str(e))
            else:
                if metric == "iou":  # the box markup is made of special tokens
                    request.setdefault("skip_special_tokens", False)
                samples[line.index] = _Sample(references, request.get("options"))
                line.body = request
        yield line


# ---- scoring ----------------------------------------------------------------------------------


def evaluate_file(
    engine: Engine,
    data: str | Path,
    metric: str,
    *,
    max_tokens: int = 128,
    results: str | Path | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> Scores:
    """Score the model behind ``engine`` on a data file; per-sample rows go to ``results``
    (JSONL, in the file's order) when given."""
    data = Path(data)
    if metric not in METRICS:
        raise Qwen2VLError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")
    if not data.is_file():
        raise Qwen2VLError(f"{data}: no such data file", code="missing_file")
    samples: dict[int, _Sample] = {}
    settings = Settings(max_tokens, {"temperature": 0.0}, data.parent)
    with open(data, encoding="utf-8") as f:
        state = Progress(0, sum(1 for text in f if text.strip()), 0, 0)
    rows: dict[int, dict[str, Any]] = {}
    for line, answer in answers(engine, _requests(data, metric, samples), settings):
        rows[line.index] = _row(metric, answer, samples.get(line.index))
        state.done += 1
        state.errors += "error" in answer
        state.tokens += answer.get("usage", {}).get("completion_tokens", 0)
        if progress is not None:
            progress(state)
    scores = Scores(str(data), metric)
    for row in rows.values():
        if "error" in row:
            scores.errors += 1
        else:
            scores.samples += 1
            scores.total += row["score"]
    if results is not None:
        with open(results, "w", encoding="utf-8") as out:
            for index in sorted(rows):
                out.write(json.dumps(rows[index], ensure_ascii=False) + "\n")
    return scores


def _row(metric: str, answer: dict[str, Any], sample: _Sample | None) -> dict[str, Any]:
    if "error" in answer:
        return answer
    reply = answer["text"]
    row = {"id": answer["id"], "reply": reply, "references": sample.references}
    if metric == "iou":
        row["iou"] = round(metrics.box_iou(reply, sample.references), 4)
    row["score"] = score(metric, reply, sample.references, sample.options)
    return row


def format_table(scores: list[Scores]) -> str:
    """A Markdown table: data, metric, samples scored, errors, score."""
    lines = ["| data | metric | samples | errors | score |", "|---|---|---|---|---|"]
    for s in scores:
        lines.append(
            f"| {s.data} | {METRICS[s.metric]} | {s.samples} | {s.errors} | {100 * s.score:.1f} % |"
        )
    return "\n".join(lines)
