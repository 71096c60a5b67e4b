"""A synthetic data set on disk: `data.jsonl` in the trainer's format plus PNG media beside it.

Each line is {"id", "task", "messages", "answer", "target"} (+ "box" for grounding, in [0, 1000)
coordinates); the trainer reads only "messages" and ignores the rest, which eval scores against.
Media paths are relative to the JSONL. A video is its list of PNG frames with "sample_fps", and
a per-part "min_pixels" so the small frames are not blown up to the video default of ~100k pixels.

Sample i of task t is drawn from its own generator seeded with (seed, t's index, i): a data set
is byte-identical for the same seed, and asking for more samples only appends to each task.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from qwen2vl.synth.tasks import ALL_TASKS, TASKS, VIDEO_FPS, Sample

DATA_FILE = "data.jsonl"
MEDIA_DIR = "media"
VIDEO_MIN_PIXELS = 28 * 28 * 4  # keep frames near their own size (patches of 28 after merge)


def sample_rng(seed: int, task: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, ALL_TASKS.index(task), index])


def make_sample(task: str, *, seed: int, index: int) -> Sample:
    """Sample `index` of `task` in the data set of `seed` (what `generate_dataset` writes)."""
    return TASKS[task](sample_rng(seed, task, index))


def counts_per_task(n_per_task: Mapping[str, int] | int, tasks: Sequence[str]) -> dict[str, int]:
    unknown = [t for t in tasks if t not in TASKS]
    if isinstance(n_per_task, Mapping):
        unknown += [t for t in n_per_task if t not in TASKS]
        counts = {t: int(n_per_task.get(t, 0)) for t in tasks}
    else:
        counts = {t: int(n_per_task) for t in tasks}
    if unknown:
        raise ValueError(f"unknown synthetic tasks {unknown}; known: {list(ALL_TASKS)}")
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"negative sample count in {counts}")
    return counts


def generate_dataset(
    out_dir: str | Path,
    *,
    n_per_task: Mapping[str, int] | int,
    seed: int,
    tasks: Sequence[str] = ALL_TASKS,
) -> Path:
    """Write `out_dir/data.jsonl` and its media (grouped by task, in `tasks` order); the path."""
    out = Path(out_dir)
    (out / MEDIA_DIR).mkdir(parents=True, exist_ok=True)
    path = out / DATA_FILE
    with open(path, "w", encoding="utf-8") as f:
        for task, n in counts_per_task(n_per_task, tasks).items():
            for i in range(n):
                sample = make_sample(task, seed=seed, index=i)
                line = record(sample, f"{task}_{i:05d}", out)
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return path


def record(sample: Sample, name: str, out: Path) -> dict[str, Any]:
    """The JSONL object of `sample`, its media written under `out/media` with stem `name`."""
    images = []
    for j, image in enumerate(sample.images):
        images.append(f"{MEDIA_DIR}/{name}_{j}.png")
        _save(image, out / images[-1])
    frames = None
    if sample.video is not None:
        frames = [f"{MEDIA_DIR}/{name}/{k:02d}.png" for k in range(len(sample.video))]
        (out / MEDIA_DIR / name).mkdir(exist_ok=True)
        for frame, rel in zip(sample.video, frames, strict=True):
            _save(frame, out / rel)
    line: dict[str, Any] = {
        "id": name,
        "task": sample.task,
        "messages": conversation(sample, images=images, frames=frames),
        "answer": sample.answer,
        "target": sample.target,
    }
    if sample.box is not None:
        b = sample.box
        line["box"] = [b.x1, b.y1, b.x2, b.y2]
    return line


def conversation(
    sample: Sample,
    *,
    images: Sequence[Any] | None = None,
    frames: Sequence[Any] | None = None,
    answer: bool = True,
) -> list[dict[str, Any]]:
    """The sample as messages: its images (or the `images` given in their place, e.g. paths),
    its video frames (or `frames`), the question, and with `answer` the assistant's reply."""
    content: list[dict[str, Any]] = [
        {"type": "image", "image": image} for image in (sample.images if images is None else images)
    ]
    if sample.video is not None:
        content.append(
            {"type": "video", "video": list(sample.video if frames is None else frames),
             "sample_fps": VIDEO_FPS, "min_pixels": VIDEO_MIN_PIXELS}
        )  # fmt: skip
    content.append({"type": "text", "text": sample.question})
    messages = [{"role": "user", "content": content}]
    if answer:
        messages.append({"role": "assistant", "content": sample.answer})
    return messages


def _save(image: Image.Image, path: Path) -> None:
    image.save(path, format="PNG", optimize=False)  # no metadata: same pixels, same bytes


# ---- `qwen2vl synth-data` ---------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`qwen2vl synth-data --out DIR --seed S --n N [--n-task TASK=N ...]`: N samples per task
    (or the given count for a task) as data.jsonl + media/ in DIR; prints the counts."""
    p.add_argument("--out", required=True, help="directory for data.jsonl and media/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=100, help="samples per task")
    p.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=ALL_TASKS)
    p.add_argument(
        "--n-task", nargs="+", default=[], metavar="TASK=N", help="another count for some tasks"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    n_per_task = dict.fromkeys(args.tasks, args.n)
    for item in args.n_task:
        task, _, n = item.partition("=")
        if task not in args.tasks or not n.isdigit():
            print(f"error: --n-task wants TASK=N, TASK one of {args.tasks}; got {item!r}",
                  file=sys.stderr)  # fmt: skip
            return 2
        n_per_task[task] = int(n)
    path = generate_dataset(args.out, n_per_task=n_per_task, seed=args.seed, tasks=args.tasks)
    with open(path, encoding="utf-8") as f:
        counts = Counter(json.loads(line)["task"] for line in f)
    for task in args.tasks:
        print(f"{task:16s} {counts[task]}")
    print(f"{'total':16s} {sum(counts.values())}  -> {path}")
    return 0
