"""Benchmark qwen2vl against transformers on the same weights, image and prompt, in one process.

    python -m qwen2vl.bench [--model DIR | --preset 2B] [--layers N] [--new-tokens 32]
                            [--device cpu|cuda]

Without --model it writes a random-weight checkpoint of the preset's architecture (bf16) to a
temporary directory. It measures this machine's memory read bandwidth and bf16 matmul rate, then
for each implementation: load time, vision-encoder time (448x448 -> 256 tokens), time to first
token, decode tokens/s and peak memory (RSS on the CPU, allocated GPU memory on CUDA); qwen2vl
also in weight-only int8. Decode is also reported as a fraction of the bandwidth limit (bytes of
weights read per token / bandwidth). Prints a table with ratios; asserts nothing. transformers
is needed (pip install -e '.[test]'). On CUDA both run bf16 with PyTorch's SDPA (no flash-attn).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import qwen2vl
from qwen2vl.config import preset
from qwen2vl.generation.compute import cpu_matmuls
from qwen2vl.generation.generate import Generator
from qwen2vl.generation.quantize import quantize_int8
from qwen2vl.generation.sampling import SamplingParams


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="qwen2vl bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory (default: random weights of --preset)")
    p.add_argument("--preset", default="2B", choices=["2B", "7B", "72B"])
    p.add_argument("--layers", type=int, default=None, help="LLM layers of the random model")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument(
        "--image-size", type=int, default=448, help="square image side (448 -> 256 tokens)"
    )
    p.add_argument("--repeats", type=int, default=3, help="repeats of the timed vision encoder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--skip-reference", action="store_true", help="qwen2vl only")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {where}; threads {torch.get_num_threads()}; torch {torch.__version__}")
    machine = measure_machine(device)
    print(
        f"memory read {machine['bandwidth'] / 1e9:.1f} GB/s; matmul bf16 "
        f"{machine['bf16_flops'] / 1e9:.0f} GFLOP/s, fp32 {machine['fp32_flops'] / 1e9:.0f} GFLOP/s"
    )
    with tempfile.TemporaryDirectory(prefix="qwen2vl-bench-") as tmp:
        path = Path(args.model) if args.model else random_checkpoint(args, Path(tmp))
        batch = {k: v.to(device) for k, v in bench_inputs(path, args.image_size).items()}
        runs = [
            ("qwen2vl bf16", lambda: bench_ours(path, batch, args, int8=False)),
            ("qwen2vl int8", lambda: bench_ours(path, batch, args, int8=True)),
        ]
        if not args.skip_reference:
            runs.append(("transformers bf16", lambda: bench_reference(path, batch, args)))
        rows = {}
        reads = [machine["bandwidth"]]
        for name, run in runs:
            rows[name] = run()
            print(
                f"{name}: " + ", ".join(f"{k} {v:.3g}" for k, v in rows[name].items()), flush=True
            )
            reads.append(measure_bandwidth(device))
        # A shared machine's bandwidth drifts (36-72 GB/s within minutes, seen here): the limit
        # is the median of the reads taken before and after every implementation's run.
        machine["bandwidth"] = statistics.median(reads)
        print(f"memory read over the run: {', '.join(f'{r / 1e9:.1f}' for r in reads)} GB/s")
        print_table(rows, machine, bytes_per_token(path))
    return 0


# ---- machine ---------------------------------------------------------------------------------


def measure_bandwidth(device: torch.device | str = "cpu") -> float:
    """Bytes per second of the best of ten sums over a buffer far larger than the caches."""
    gpu = torch.device(device).type == "cuda"
    buf = torch.ones((4096 if gpu else 512) * 2**20 // 4, device=device)  # touched: resident
    return buf.numel() * 4 / _best(lambda: buf.sum(), 10)


def measure_machine(device: torch.device | str = "cpu") -> dict[str, float]:
    gpu = torch.device(device).type == "cuda"
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm = _best(lambda: a @ a, 3)
    f = a.float()
    mm32 = _best(lambda: f @ f, 3)
    return {
        "bandwidth": measure_bandwidth(device),
        "bf16_flops": 2 * n**3 / mm,
        "fp32_flops": 2 * n**3 / mm32,
    }


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _sync() -> None:
    if _cuda_in_use():
        torch.cuda.synchronize()


def _times(fn: Callable[[], object], n: int) -> list[float]:
    """Seconds of each of n calls, the device's queued work included."""
    times = []
    for _ in range(n):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return times


def _best(fn: Callable[[], object], n: int) -> float:
    fn()
    return min(_times(fn, n))


def _median(fn: Callable[[], object], n: int) -> float:
    if n > 1:  # warm up; single runs of slow steps are timed cold
        fn()
    return statistics.median(_times(fn, n))


# ---- inputs ----------------------------------------------------------------------------------


def random_checkpoint(args: argparse.Namespace, tmp: Path) -> Path:
    cfg = preset(args.preset)
    if args.layers:
        cfg.text.num_hidden_layers = args.layers
    cfg.torch_dtype = "bfloat16"
    print(f"writing a random {args.preset} checkpoint ({cfg.text.num_hidden_layers} LLM layers)")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = qwen2vl.Qwen2VL(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    qwen2vl.save_pretrained(model, tmp / "model")
    del model
    gc.collect()
    return tmp / "model"


def bench_inputs(path: Path, size: int) -> dict:
    """A size x size image (448 -> 256 tokens) and a short question, through our processor."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    proc = qwen2vl.load_processor(path)
    messages = [
        {
            "role": "user",
            "content": [
                {
                    "type": "image",
                    "image": image,
                    "min_pixels": size * size,
                    "max_pixels": size * size,
                },
                {
                    "type": "text",
                    "text": "Describe this picture in detail, including every object.",
                },
            ],
        }
    ]
    return proc(messages)


def bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads: every LLM weight except the embedding table (one row),
    plus lm_head (the embedding itself when tied)."""
    cfg = qwen2vl.Qwen2VLConfig.from_file(path / "config.json")
    with torch.device("meta"):
        model = qwen2vl.Qwen2VL(cfg)
    n = sum(p.numel() for p in model.model.layers.parameters()) + model.lm_head.weight.numel()
    return 2 * (n + cfg.text.hidden_size)


# ---- implementations -------------------------------------------------------------------------


def peak_rss_reset() -> None:
    gc.collect()
    if _cuda_in_use():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def peak_rss() -> int:
    """Peak resident memory; on CUDA the peak allocated GPU memory (what bounds batch sizes)."""
    if _cuda_in_use():
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def bench_ours(path: Path, batch: dict, args: argparse.Namespace, *, int8: bool) -> dict:
    peak_rss_reset()
    device = batch["input_ids"].device
    t = time.perf_counter()
    model = qwen2vl.load_model(path, dtype="bfloat16", device=str(device))
    if device.type == "cpu":
        cpu_matmuls(model)
    if int8:
        quantize_int8(model)
    _sync()
    load = time.perf_counter() - t
    pv, grid = batch["pixel_values"], batch["image_grid_thw"]
    with torch.inference_mode():
        vision = _median(lambda: model.encode_visual(pv, grid), args.repeats)

    def first_token():
        gen = Generator.start(
            model, batch, SamplingParams(max_new_tokens=args.new_tokens), stop_token_ids=[]
        )
        gen.step()
        return gen

    ttft = _median(first_token, _cold_or_warm(args))
    gen = first_token()
    _sync()
    t = time.perf_counter()
    for _ in gen:
        pass
    _sync()
    decode = (gen.n_new - 1) / (time.perf_counter() - t)
    return _row(load, vision, ttft, decode)


def bench_reference(path: Path, batch: dict, args: argparse.Namespace) -> dict:
    import transformers

    peak_rss_reset()
    t = time.perf_counter()
    # .to() rather than device_map=: device_map needs accelerate, not a dependency here
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16)
    model = model.to(batch["input_ids"].device).eval()
    _sync()
    load = time.perf_counter() - t
    pv, grid = batch["pixel_values"], batch["image_grid_thw"]
    ids = batch["input_ids"]
    inputs = dict(batch, mm_token_type_ids=(ids == model.config.image_token_id).int())
    with torch.inference_mode():
        vision = _median(lambda: model.model.get_image_features(pv, grid), args.repeats)

        def run(n):
            return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        ttft = _median(lambda: run(1), _cold_or_warm(args))
        _sync()
        t = time.perf_counter()
        run(args.new_tokens)
        _sync()
        total = time.perf_counter() - t
    decode = (args.new_tokens - 1) / max(total - ttft, 1e-9)
    return _row(load, vision, ttft, decode)


def _cold_or_warm(args: argparse.Namespace) -> int:
    """Runs of the first-token timing: one cold run on the CPU (a slow step), the median of
    warm runs on CUDA (the first call there pays for lazy library and kernel set-up)."""
    return args.repeats if args.device.startswith("cuda") else 1


def _row(load: float, vision: float, ttft: float, decode: float) -> dict:
    return {
        "load_s": load,
        "vision_s": vision,
        "ttft_s": ttft,
        "decode_tok_s": decode,
        "peak_rss": peak_rss(),
    }


# ---- report ----------------------------------------------------------------------------------


def print_table(rows: dict[str, dict], machine: dict[str, float], bpt: int) -> None:
    limit = machine["bandwidth"] / bpt
    ref = rows.get("transformers bf16")
    print(
        f"\nweights read per decode token (bf16): {bpt / 1e9:.2f} GB -> bandwidth limit "
        f"{limit:.2f} tok/s (int8 reads about half)"
    )
    header = (
        f"{'':<18} {'load s':>8} {'vision s':>9} {'TTFT s':>8} {'decode tok/s':>13} "
        f"{'% of limit':>10} {'peak mem GB':>12}"
    )
    print(header)
    for name, r in rows.items():
        frac = r["decode_tok_s"] / limit * (0.5 if "int8" in name else 1.0)
        print(
            f"{name:<18} {r['load_s']:>8.2f} {r['vision_s']:>9.3f} {r['ttft_s']:>8.3f} "
            f"{r['decode_tok_s']:>13.2f} {100 * frac:>9.0f}% {r['peak_rss'] / 1e9:>12.2f}"
        )
    if ref:
        print("\nratios vs transformers bf16 (higher is better for us):")
        for name, r in rows.items():
            if r is ref:
                continue
            print(
                f"  {name:<16} vision {ref['vision_s'] / r['vision_s']:.2f}x  "
                f"TTFT {ref['ttft_s'] / r['ttft_s']:.2f}x  "
                f"decode {r['decode_tok_s'] / ref['decode_tok_s']:.2f}x  "
                f"load {ref['load_s'] / r['load_s']:.2f}x  "
                f"peak memory {r['peak_rss'] / ref['peak_rss']:.2f} of theirs"
            )


if __name__ == "__main__":
    raise SystemExit(main())
