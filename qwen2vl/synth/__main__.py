"""`python -m qwen2vl.synth --out DIR --seed S --n N [--n-task TASK=N ...]`: write a synthetic
data set (N samples per task, or the given count for a task), print the counts."""

from __future__ import annotations

import argparse
import json
from collections import Counter

from qwen2vl.synth.dataset import generate_dataset
from qwen2vl.synth.tasks import ALL_TASKS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m qwen2vl.synth", description=__doc__)
    p.add_argument("--out", required=True, help="directory for data.jsonl and media/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=100, help="samples per task")
    p.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=ALL_TASKS)
    p.add_argument(
        "--n-task", nargs="+", default=[], metavar="TASK=N", help="another count for some tasks"
    )
    args = p.parse_args(argv)
    n_per_task = dict.fromkeys(args.tasks, args.n)
    for item in args.n_task:
        task, _, n = item.partition("=")
        if task not in args.tasks or not n.isdigit():
            p.error(f"--n-task wants TASK=N with TASK one of {args.tasks}, got {item!r}")
        n_per_task[task] = int(n)
    path = generate_dataset(args.out, n_per_task=n_per_task, seed=args.seed, tasks=args.tasks)
    with open(path, encoding="utf-8") as f:
        counts = Counter(json.loads(line)["task"] for line in f)
    for task in args.tasks:
        print(f"{task:16s} {counts[task]}")
    print(f"{'total':16s} {sum(counts.values())}  -> {path}")


if __name__ == "__main__":
    main()
