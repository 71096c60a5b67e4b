"""qwen2vl against transformers on the same weights, image and prompt, in one process: load time,
vision tower, time to first token, decode tokens/s and peak memory, then the ratios. Prints
numbers; asserts nothing. Needs transformers (pip install -e '.[test]').

    .venv/bin/python benchmarks/compare_transformers.py [--model DIR | --preset 2B] [--layers N]
        [--new-tokens 32] [--image-size 448] [--repeats 3] [--rounds 1] [--device cpu|cuda]

The implementations run interleaved (each round runs every one in turn, a bandwidth read after
each), so a shared machine's drift falls on all alike; each figure is the median over rounds.
Both generate exactly --new-tokens tokens (transformers with min_new_tokens = max_new_tokens, and
the count is checked): a rate from a run that stopped early or took no measurable time is refused
(``qwen2vl.bench.decode_rate``), never printed. On CUDA both run bf16 with PyTorch's SDPA.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

from qwen2vl.bench import (
    Row,
    add_arguments,
    bandwidth_over_run,
    bytes_per_token,
    decode_rate,
    first_token_runs,
    measure_bandwidth,
    measure_qwen2vl,
    median_time,
    peak_mem,
    peak_mem_reset,
    prepare,
    print_table,
    timed,
)
from qwen2vl.config import Qwen2VLConfig

REFERENCE = "transformers bf16"
REFERENCE_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.add_argument("--rounds", type=int, default=1, help="interleaved runs of every implementation")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # qwen2vl's kernel choice
    with tempfile.TemporaryDirectory(prefix="qwen2vl-compare-") as tmp:
        path, batch, bandwidth = prepare(args, Path(tmp))
        n, repeats = args.new_tokens, args.repeats
        runs = {
            "qwen2vl bf16": lambda: measure_qwen2vl(
                path, batch, quantize=None, new_tokens=n, repeats=repeats
            ),
            "qwen2vl int8": lambda: measure_qwen2vl(
                path, batch, quantize="int8", new_tokens=n, repeats=repeats
            ),
            REFERENCE: lambda: measure_transformers(path, batch, new_tokens=n, repeats=repeats),
        }
        samples: dict[str, list[Row]] = {name: [] for name in runs}
        reads = [bandwidth]
        for _ in range(args.rounds):
            for name, run in runs.items():
                samples[name].append(run())
                print(f"{name}: {samples[name][-1]}", flush=True)
                reads.append(measure_bandwidth(args.device))
        rows = {name: median_row(rs) for name, rs in samples.items()}
        print_table(rows, bandwidth_over_run(reads), bytes_per_token(path))
        print_ratios(rows)
    return 0


def measure_transformers(path: Path, batch: dict, *, new_tokens: int, repeats: int) -> Row:
    peak_mem_reset()
    device = batch["input_ids"].device

    def load():
        # .to() rather than device_map=: device_map needs accelerate, not a dependency here
        family = Qwen2VLConfig.from_file(path / "config.json").model_type
        cls = getattr(transformers, REFERENCE_CLASSES[family])
        return cls.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()

    load_s, model = timed(load)
    pv, grid, ids = batch["pixel_values"], batch["image_grid_thw"], batch["input_ids"]
    inputs = dict(batch, mm_token_type_ids=(ids == model.config.image_token_id).int())

    def run(n: int, streamer=None) -> int:
        """Generate exactly n tokens (end-of-sequence is held off until then); how many came."""
        out = model.generate(
            **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, streamer=streamer
        )
        return out.shape[1] - ids.shape[1]

    with torch.inference_mode():
        vision = median_time(lambda: model.model.get_image_features(pv, grid), repeats)
        ttft = median_time(lambda: run(1), first_token_runs(device, repeats))
        # decode: from the first new token to the last, timed as generate hands them out (a
        # difference of two runs' times went negative when the machine was busy)
        clock = TokenClock()
        run(new_tokens, clock)
    forwards = len(clock.times) - 2  # the prompt, then one put per token
    decode = decode_rate(forwards, new_tokens - 1, clock.times[-1] - clock.times[1])
    return Row(load_s, vision, ttft, decode, peak_mem())


class TokenClock:
    """A generate() streamer noting when each put (the prompt, then each new token) arrives."""

    def __init__(self):
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def median_row(rows: Sequence[Row]) -> Row:
    return Row(
        *(statistics.median(getattr(r, f.name) for r in rows) for f in dataclasses.fields(Row))
    )


def print_ratios(rows: dict[str, Row]) -> None:
    ref = rows[REFERENCE]
    print(f"\nratios vs {REFERENCE} (higher is better for qwen2vl):")
    for name, r in rows.items():
        if name == REFERENCE:
            continue
        print(
            f"  {name:<16} vision {ref.vision_s / r.vision_s:.2f}x  "
            f"TTFT {ref.ttft_s / r.ttft_s:.2f}x  "
            f"decode {r.decode_tok_s / ref.decode_tok_s:.2f}x  "
            f"load {ref.load_s / r.load_s:.2f}x  "
            f"peak memory {r.peak_mem / ref.peak_mem:.2f} of theirs"
        )


if __name__ == "__main__":
    raise SystemExit(main())
