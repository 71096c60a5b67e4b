"""Measure qwen2vl on this machine: load time, vision tower, time to first token, decode tokens/s
and peak memory, with bf16 weights and with weight-only int8 and int4.

    qwen2vl bench [--model DIR | --preset 2B] [--layers N] [--new-tokens 32]
                  [--image-size 448] [--repeats 3] [--device cpu|cuda|cuda:N|auto]

Without --model it writes a random-weight checkpoint of the preset's architecture (bf16) to a
temporary directory. The model loads through ``load_for_inference``, as the Pipeline and the
server load it. Decode is also reported as a fraction of the bandwidth limit (bytes of weights
read per token / this machine's measured memory read bandwidth). Below the table, the cost of
constrained decoding (generation/grammar.py) per token of a JSON-schema answer: mask computed,
applied to one row of logits on the device, token taken; also as a share of a bf16 decode step.
Prints a table; asserts nothing.
The comparison with transformers is ``benchmarks/compare_transformers.py``, built on these
measurements.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import qwen2vl
from qwen2vl.devices import DEVICE_HELP, resolve_device
from qwen2vl.generation import grammar
from qwen2vl.generation.generate import Generator
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.hub import resolve_model
from qwen2vl.presets import PRESETS, preset
from qwen2vl.tools import to_json

# No decode step of a whole model returns in under 10 us (a Python call and a kernel launch
# alone cost microseconds): a faster figure is a timing or counting error, never a result.
MAX_TOKENS_PER_SECOND = 100_000
# Weight bytes a decode step reads, as a fraction of bf16's: int4 linears 4.5 bits a weight (the
# group's scale and min included) and an int8 lm_head, about 0.3 on the 2B architecture.
READ_SCALE = {None: 1.0, "int8": 0.5, "int4": 0.3}


def run(args: argparse.Namespace) -> int:
    args.device = resolve_device(args.device)  # a bad value fails here, before any work
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the kernel choice, once
    with tempfile.TemporaryDirectory(prefix="qwen2vl-bench-") as tmp:
        path, batch, bandwidth = prepare(args, Path(tmp))
        rows, reads = {}, [bandwidth]
        for quantize in (None, "int8", "int4"):
            name = f"qwen2vl {quantize or 'bf16'}"
            rows[name] = measure_qwen2vl(
                path, batch, quantize=quantize, new_tokens=args.new_tokens, repeats=args.repeats
            )
            print(f"{name}: {rows[name]}", flush=True)
            reads.append(measure_bandwidth(args.device))
        print_table(rows, bandwidth_over_run(reads), bytes_per_token(path))
        print_grammar(path, args.device, rows["qwen2vl bf16"].decode_tok_s)
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: random weights of --preset)")
    p.add_argument("--preset", default="2B", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=None, help="LLM layers of the random model")
    p.add_argument("--new-tokens", type=_at_least_three, default=32)
    p.add_argument(
        "--image-size", type=int, default=448, help="square image side (448 -> 256 tokens)"
    )
    p.add_argument("--repeats", type=int, default=3, help="repeats of the timed vision encoder")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--device", default="cpu", help=DEVICE_HELP)
    p.set_defaults(run=run)


def _at_least_three(text: str) -> int:
    n = int(text)
    if n < 3:  # the first token ends the prefill and feeds itself; decode is timed after that
        raise argparse.ArgumentTypeError(f"need at least 3 new tokens to time decode, got {n}")
    return n


def prepare(args: argparse.Namespace, tmp: Path) -> tuple[Path, dict, float]:
    """Threads set, the machine measured and printed, the checkpoint (``--model``, else a random
    one written under tmp) and the inputs on the device: (checkpoint, batch, bandwidth)."""
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
    path = (
        resolve_model(args.model)
        if args.model
        else random_checkpoint(args.preset, tmp, args.layers)
    )
    batch = {k: v.to(device) for k, v in bench_inputs(path, args.image_size).items()}
    return path, batch, machine["bandwidth"]


# ---- machine ---------------------------------------------------------------------------------


def measure_bandwidth(device: torch.device | str = "cpu") -> float:
    """Bytes per second of the best of ten sums over a buffer far larger than the caches."""
    gpu = torch.device(device).type == "cuda"
    buf = torch.ones((4096 if gpu else 512) * 2**20 // 4, device=device)  # touched: resident
    return buf.numel() * 4 / best_time(lambda: buf.sum(), 10)


def measure_machine(device: torch.device | str = "cpu") -> dict[str, float]:
    gpu = torch.device(device).type == "cuda"
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    mm = best_time(lambda: a @ a, 3)
    f = a.float()
    mm32 = best_time(lambda: f @ f, 3)
    return {
        "bandwidth": measure_bandwidth(device),
        "bf16_flops": 2 * n**3 / mm,
        "fp32_flops": 2 * n**3 / mm32,
    }


def bandwidth_over_run(reads: Sequence[float]) -> float:
    """The bandwidth to judge decode by, from reads taken before and after every run: a shared
    machine's drifts (36-72 GB/s within minutes, seen here), so the median of them (printed)."""
    print(f"memory read over the run: {', '.join(f'{r / 1e9:.1f}' for r in reads)} GB/s")
    return statistics.median(reads)


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def sync() -> None:
    if _cuda_in_use():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds of one call, the device's queued work included, and what it returned."""
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def best_time(fn: Callable[[], object], n: int) -> float:
    fn()
    return min(timed(fn)[0] for _ in range(n))


def median_time(fn: Callable[[], object], n: int) -> float:
    if n > 1:  # warm up; single runs of slow steps are timed cold
        fn()
    return statistics.median(timed(fn)[0] for _ in range(n))


def first_token_runs(device: torch.device, repeats: int) -> int:
    """Runs of the first-token timing: one cold run on the CPU (a slow step), the median of
    warm runs on CUDA (the first call there pays for lazy library and kernel set-up)."""
    return repeats if device.type == "cuda" else 1


# ---- inputs ----------------------------------------------------------------------------------


def random_checkpoint(name: str, out: Path, layers: int | None = None) -> Path:
    """A bf16 checkpoint of preset ``name``'s architecture (``layers`` LLM layers) with random
    weights, written to out/model."""
    cfg = preset(name)
    if layers:
        cfg.text.num_hidden_layers = layers
    cfg.torch_dtype = "bfloat16"
    print(f"writing a random {name} checkpoint ({cfg.text.num_hidden_layers} LLM layers)")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = qwen2vl.Qwen2VL(cfg)
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # never float32: half the memory
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    qwen2vl.save_pretrained(model, out / "model")
    del model
    gc.collect()
    return out / "model"


def bench_inputs(path: Path, size: int) -> dict:
    """A size x size image (448 -> 256 tokens) and a short question, through our processor."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    pixels = {"min_pixels": size * size, "max_pixels": size * size}
    question = "Describe this picture in detail, including every object."
    content = [{"type": "image", "image": image, **pixels}, {"type": "text", "text": question}]
    return qwen2vl.load_processor(path)([{"role": "user", "content": content}])


def bytes_per_token(path: Path) -> int:
    """Weight bytes a decode step reads: every LLM weight except the embedding table (one row),
    plus lm_head (the embedding itself when tied)."""
    cfg = qwen2vl.Qwen2VLConfig.from_file(path / "config.json")
    with torch.device("meta"):
        model = qwen2vl.Qwen2VL(cfg)
    n = sum(p.numel() for p in model.model.layers.parameters()) + model.lm_head.weight.numel()
    return 2 * (n + cfg.text.hidden_size)


# ---- measurements ----------------------------------------------------------------------------


class MeasurementError(ValueError):
    """A timing that cannot be a real figure (a run that stopped early, a near-zero time)."""


def decode_rate(tokens: int, requested: int, seconds: float) -> float:
    """Tokens per second of a decode asked for ``requested`` tokens that produced ``tokens`` in
    ``seconds``. Raises rather than return a rate from a run that stopped early (not comparable
    with one that did not) or one faster than ``MAX_TOKENS_PER_SECOND`` (a timing error)."""
    if tokens != requested:
        raise MeasurementError(
            f"decoded {tokens} tokens where {requested} were asked for: the run stopped early"
        )
    if requested < 1 or seconds * MAX_TOKENS_PER_SECOND < tokens:
        raise MeasurementError(f"{tokens} tokens in {seconds:.3g} s is not a real decode rate")
    return tokens / seconds


@dataclass
class Row:
    load_s: float
    vision_s: float
    ttft_s: float
    decode_tok_s: float
    peak_mem: int  # bytes: resident memory on the CPU, allocated GPU memory on CUDA
    read_scale: float = 1.0  # weight bytes read per decode token, as a fraction of bf16's

    def __str__(self) -> str:
        return (
            f"load {self.load_s:.3g} s, vision {self.vision_s:.3g} s, TTFT {self.ttft_s:.3g} s, "
            f"decode {self.decode_tok_s:.3g} tok/s, peak memory {self.peak_mem / 1e9:.3g} GB"
        )


def peak_mem_reset() -> None:
    gc.collect()
    if _cuda_in_use():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def peak_mem() -> int:
    """Peak resident memory; on CUDA the peak allocated GPU memory (what bounds batch sizes)."""
    if _cuda_in_use():
        return torch.cuda.max_memory_allocated()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_qwen2vl(
    path: Path, batch: dict, *, quantize: str | None, new_tokens: int, repeats: int
) -> Row:
    peak_mem_reset()
    device = batch["input_ids"].device
    load, model = timed(lambda: load_for_inference(path, "bfloat16", device, quantize=quantize))
    pv, grid = batch["pixel_values"], batch["image_grid_thw"]
    with torch.inference_mode():
        vision = median_time(lambda: model.encode_visual(pv, grid), repeats)

    def first_token() -> Generator:
        params = SamplingParams(max_new_tokens=new_tokens)
        gen = Generator.start(model, batch, params, stop_token_ids=[])
        gen.step()
        return gen

    ttft = median_time(first_token, first_token_runs(device, repeats))
    gen = first_token()  # its step fed the first token: a forward of the decode
    seconds, _ = timed(lambda: list(gen))  # the other forwards: the last token is not fed
    decode = decode_rate(gen.n_new - 2, new_tokens - 2, seconds)
    return Row(load, vision, ttft, decode, peak_mem(), READ_SCALE[quantize])


# ---- report ----------------------------------------------------------------------------------


def print_table(rows: dict[str, Row], bandwidth: float, bpt: int) -> None:
    """One line per row; decode also as a percentage of the bandwidth limit, bandwidth / bytes
    read per token (``bpt`` for bf16 weights, scaled by each row's ``read_scale``)."""
    limit = bandwidth / bpt
    print(
        f"\nweights read per decode token (bf16): {bpt / 1e9:.2f} GB -> bandwidth limit "
        f"{limit:.2f} tok/s (int8 reads about half, int4 about 0.3)"
    )
    print(
        f"{'':<18} {'load s':>8} {'vision s':>9} {'TTFT s':>8} {'decode tok/s':>13} "
        f"{'% of limit':>10} {'peak mem GB':>12}"
    )
    for name, r in rows.items():
        frac = r.decode_tok_s / limit * r.read_scale
        print(
            f"{name:<18} {r.load_s:>8.2f} {r.vision_s:>9.3f} {r.ttft_s:>8.3f} "
            f"{r.decode_tok_s:>13.2f} {100 * frac:>9.0f}% {r.peak_mem / 1e9:>12.2f}"
        )


# ---- constrained decoding --------------------------------------------------------------------

GRAMMAR_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "kind": {"enum": ["person", "robot", "other"]},
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address", "kind"],
    "additionalProperties": False,
}
GRAMMAR_ANSWER = {
    "name": "Ada Lovelace, née Byron",
    "age": 36,
    "email": "ada@example.com",
    "tags": ["mathematics", "poetry", "engines"],
    "address": {"city": "London", "zip": "12345"},
    "kind": "person",
    "score": 9.75,
}


def measure_grammar(path: Path, device: str, repeats: int = 3) -> tuple[float, float]:
    """(seconds per token, seconds to compile) of GRAMMAR_SCHEMA: the median over the answer's
    tokens of mask + masked argmax over one row of logits [V] on ``device`` + advance, as the
    server's Sequence.choose does them."""
    tokenizer = qwen2vl.load_processor(path).tokenizer
    vocab = qwen2vl.Qwen2VLConfig.from_file(path / "config.json").text.vocab_size
    ids = tokenizer.encode(to_json(GRAMMAR_ANSWER))
    grammar.token_info(tokenizer)  # once per tokenizer, not per request
    compile_s, compiled = timed(
        lambda: grammar.Grammar(tokenizer, grammar.json_schema(GRAMMAR_SCHEMA))
    )
    logits = torch.randn(vocab, device=device)
    times = []
    for _ in range(repeats):
        state = compiled.state()
        for token in ids:
            start = time.perf_counter()
            allowed = state.allowed(vocab, logits.device)
            int(logits.masked_fill(~allowed, float("-inf")).argmax())  # waits for the device
            state.advance(token)
            times.append(time.perf_counter() - start)
    return statistics.median(times), compile_s


def print_grammar(path: Path, device: str, decode_tok_s: float) -> None:
    try:
        per_token, compile_s = measure_grammar(path, device)
    except grammar.GrammarError as e:  # llguidance not installed
        print(f"\nconstrained decoding: not measured ({e})")
        return
    step = 1 / decode_tok_s
    print(
        f"\nconstrained decoding (llguidance, JSON schema): {per_token * 1e3:.3f} ms per token "
        f"(mask + apply + advance) = {100 * per_token / step:.2g}% of a bf16 decode step "
        f"({step * 1e3:.1f} ms); compile {compile_s * 1e3:.1f} ms"
    )
