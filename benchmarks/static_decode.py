"""Decode speed on CUDA: the dynamic step against the static one replayed as a CUDA graph.
Prints numbers; asserts nothing.

    .venv/bin/python benchmarks/static_decode.py [--preset 2B] [--batch 1 4 8] [--steps 128]
        [--prompt-tokens 64] [--layers N] [--device cuda]

Random weights of the preset's LLM (bf16, built on the device: nothing is written to disk);
text prompts of --prompt-tokens tokens (--device cpu: a smoke run, both paths eager). Per batch
size and path: the first decode step (for the static path it includes the warm-up and graph
capture), then the time per step over --steps steps (synchronised), as tokens per second per row
and in all; then how many greedy tokens the two paths share before they first differ (random
weights give near-ties, which bf16 may split).
"""

from __future__ import annotations

import argparse
import time

import torch

import qwen2vl
from qwen2vl.generation.generate import Generator
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.presets import preset


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(model, ids: torch.Tensor, steps: int, static: bool) -> tuple[float, float, list]:
    params = SamplingParams(max_new_tokens=steps + 2)
    gen = Generator.start(model, {"input_ids": ids}, params, stop_token_ids=[], static=static)
    tokens = [gen.step().tokens]
    sync(ids.device)
    t0 = time.perf_counter()
    tokens.append(gen.step().tokens)  # the first fed step: captures the graph when static
    sync(ids.device)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens.append(gen.step().tokens)
    sync(ids.device)
    return first, (time.perf_counter() - t0) / steps, torch.stack(tokens, 1).tolist()


def common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="2B")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    cfg = preset(args.preset)
    if args.layers:
        cfg.text.num_hidden_layers = args.layers
    torch.manual_seed(0)
    with torch.device(args.device):
        model = qwen2vl.Qwen2VL(cfg).to(torch.bfloat16).eval()
    for B in args.batch:
        ids = torch.randint(0, 150000, (B, args.prompt_tokens), device=args.device)
        results = {
            name: run(model, ids, args.steps, name == "static") for name in ("eager", "static")
        }
        for name, (first, step, _) in results.items():
            print(f"B={B} {name:6s} first step {first * 1e3:7.1f} ms; step {step * 1e3:6.2f} ms: "
                  f"{1 / step:7.1f} tok/s per row, {B / step:8.1f} in all")  # fmt: skip
        eager, static = results["eager"][2], results["static"][2]
        shared = [common_prefix(a, b) for a, b in zip(eager, static, strict=True)]
        print(f"B={B} greedy tokens shared before the first difference, per row: {shared}")


if __name__ == "__main__":
    main()
