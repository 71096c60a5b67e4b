"""Where one decode step of the generation loop spends its time (CPU): the step a user runs
(``Generator.step``: sampling, cache write, embedding, layers, lm_head), profiled end to end.

    .venv/bin/python benchmarks/decode_profile.py [--model DIR | --preset 2B] [--layers N]
        [--quantize int8|int4] [--steps 16] [--threads N]

Prints the wall time per step, the weight bytes it reads and the bandwidth that implies (against
this machine's measured read bandwidth), then the profiler's operators by self time, grouped:
the compiled decoder layers (compute.CPUDecoderLayer), the linear layers outside them (our
decode kernels or aten::linear), attention, the sampler over the vocabulary, the cache write,
everything else; and the part of the wall time no operator accounts for (Python and dispatch).
Asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from qwen2vl.bench import bytes_per_token, measure_bandwidth, random_checkpoint
from qwen2vl.generation import gemv, generate
from qwen2vl.generation.compute import CPULinear
from qwen2vl.generation.generate import Generator
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.quantize import Int4Linear, Int8Linear
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.presets import PRESETS

GROUPS = {  # event name fragment -> group, first match wins (ranges are ours: see label())
    "compiled layer": "decoder layers (compiled)",
    "lm_head": "lm_head",
    "linear": "linear layers",
    "addmm": "linear layers",
    "aten::mm": "linear layers",
    "sampler": "sampler",
    "argmax": "sampler",
    "scaled_dot_product": "attention",
    "bmm": "attention",
    "softmax": "attention",
    "copy_": "copies / cache writes",
    "index": "copies / cache writes",
    "cat": "copies / cache writes",
}


def group(name: str) -> str:
    low = name.lower()
    return next((g for frag, g in GROUPS.items() if frag in low), "other operators")


def label(model: torch.nn.Module) -> None:
    """Name our decode kernels' calls (C++ outside aten, so the profiler sees no operator for
    them), the compiled decoder layer's two calls and the sampler, as profiler ranges."""
    for name, m in model.named_modules():
        if isinstance(m, CPULinear | Int8Linear | Int4Linear) or type(m) is torch.nn.Linear:
            tag = "lm_head" if name.endswith("lm_head") else "linear"
            m.forward = _in_range(tag, m.forward)
    generate.sample = _in_range("sampler", generate.sample)
    for name in ("attention_inputs", "attention_output_and_mlp"):  # looked up at each call
        setattr(gemv, name, _in_range("compiled layer", getattr(gemv, name)))


def _in_range(tag: str, fn):
    def call(*args, **kwargs):
        with record_function(tag):
            return fn(*args, **kwargs)

    return call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--preset", default="2B", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="qwen2vl-profile-") as tmp:
        path = args.model or random_checkpoint(args.preset, Path(tmp), args.layers)
        model = load_for_inference(path, "bfloat16", "cpu", quantize=args.quantize)
        bpt = bytes_per_token(path)
    scale = {None: 1.0, "int8": 0.5, "int4": 0.3}[args.quantize]
    ids = torch.randint(0, 150000, (1, args.prompt_tokens))
    params = SamplingParams(max_new_tokens=3 * args.steps + 8)
    gen = Generator.start(model, {"input_ids": ids}, params, stop_token_ids=[])
    for _ in range(args.steps):  # warm-up
        gen.step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        gen.step()
    wall = (time.perf_counter() - t0) / args.steps
    label(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            gen.step()
        profiled = (time.perf_counter() - t0) / args.steps
    bandwidth = measure_bandwidth()
    read = bpt * scale
    print(f"threads {torch.get_num_threads()}; {args.quantize or 'bf16'}; one row; "
          f"context {args.prompt_tokens + 2 * args.steps} tokens")  # fmt: skip
    print(
        f"decode step {wall * 1e3:.1f} ms ({1 / wall:.1f} tok/s); profiled {profiled * 1e3:.1f} ms"
    )
    print(f"weights read per step {read / 1e9:.2f} GB -> {read / wall / 1e9:.1f} GB/s "
          f"of {bandwidth / 1e9:.1f} GB/s measured ({read / wall / bandwidth:.0%})")  # fmt: skip
    totals: dict[str, float] = defaultdict(float)
    top = []
    for e in prof.key_averages():
        us = e.self_cpu_time_total / args.steps
        totals[group(e.key)] += us
        top.append((us, e.key, e.count // args.steps))
    accounted = sum(totals.values())
    print("\nself time per step, by group:")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<24} {us / 1e3:8.2f} ms  {us / 1e3 / (profiled * 1e3):6.1%}")
    rest = profiled * 1e6 - accounted
    print(f"  {'no operator (Python)':<24} {rest / 1e3:8.2f} ms  {rest / (profiled * 1e6):6.1%}")
    print("\ntop operators per step (self time, calls):")
    for us, key, calls in sorted(top, reverse=True)[:15]:
        print(f"  {us / 1e3:8.3f} ms  {calls:5d}  {key}")


if __name__ == "__main__":
    main()
