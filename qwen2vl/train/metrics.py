"""What a run shows and leaves behind: a progress bar on stderr, metrics.jsonl and loss.png.

The bar redraws in place on a terminal and prints one line per log interval otherwise (CI logs).
metrics.jsonl holds one JSON object per optimizer step; on resume, lines past the checkpoint's
step are dropped so the file reads as one uninterrupted run. The loss curve is drawn with Pillow
(already a dependency) rather than matplotlib.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from PIL import Image, ImageDraw


class Progress:
    """step/total, a bar, loss, tokens/s and ETA, on one line."""

    def __init__(self, total: int, start: int = 0, *, every: int = 1, stream: TextIO | None = None):
        self.total, self.start, self.every = total, start, every
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self.tokens = 0

    def update(self, step: int, loss: float, tokens: int) -> None:
        """After optimizer step `step` (1-based) processed `tokens` tokens."""
        self.tokens += tokens
        elapsed = max(time.monotonic() - self.t0, 1e-9)
        done = step - self.start
        eta = elapsed / max(done, 1) * (self.total - step)
        filled = 24 * step // max(self.total, 1)
        line = (
            f"step {step}/{self.total} [{'#' * filled}{'.' * (24 - filled)}] "
            f"loss {loss:.4f}  {self.tokens / elapsed:,.0f} tok/s  eta {_clock(eta)}"
        )
        if self.tty:
            end = "\n" if step == self.total else ""
            print(f"\r{line}\033[K", end=end, file=self.stream, flush=True)
        elif step % self.every == 0 or step == self.total:
            print(line, file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    """Appends one JSON line per step to `path`."""

    def __init__(self, path: str | Path, *, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def plot_loss(
    records: list[dict[str, Any]],
    path: str | Path,
    *,
    size=(800, 450),
    marks: list[tuple[int, str]] = (),
) -> None:
    """loss against step as a PNG: axes, the curve, the min/max values as labels, and a
    labelled vertical line at each of `marks` (step, label), e.g. where each stage begins.
    The loss axis is logarithmic when the curve spans more than a factor of 20."""
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 70, 30, size[0] - 20, size[1] - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), "training loss", fill="black")
    if points:
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1.0
        log = lo > 0 and hi / lo > 20
        scale = math.log if log else (lambda v: v)

        def xy(step: float, loss: float) -> tuple[float, float]:
            x = left + (right - left) * (step - s0) / (s1 - s0)
            frac = (scale(loss) - scale(lo)) / (scale(hi) - scale(lo))
            return x, bottom - (bottom - top) * frac

        for step, label in marks:
            x = xy(step, lo)[0]
            draw.line([(x, top), (x, bottom)], fill=(180, 180, 180), width=1)
            draw.text((x + 3, top + 3), label, fill=(90, 90, 90))
        draw.line([xy(s, v) for s, v in points], fill=(31, 119, 180), width=2)
        if log:
            draw.text((left + 70, 8), "(log scale)", fill="black")
        for value in (lo, hi):
            draw.text((4, xy(s0, value)[1] - 6), f"{value:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {s0}", fill="black")
        draw.text((right - 70, bottom + 8), f"step {max(steps)}", fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
