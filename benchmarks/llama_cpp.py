"""qwen2vl against llama.cpp on this CPU, on the same random 2B-architecture weights: decode
tokens/s in bf16, int8 (llama.cpp q8_0) and int4 (q4_0), prompt processing of a 280-token text
prompt in bf16, and the vision tower on one image; then the ratios, against the targets (decode
bf16 >= 1.2x llama.cpp bf16, int8 >= 1.3x q8_0, int4 >= 1.1x q4_0, prompt >= 1.5x bf16). Prints
numbers; asserts nothing.

    .venv/bin/python benchmarks/llama_cpp.py [--layers 28] [--rounds 3] [--new-tokens 32]
        [--threads 2] [--image-size 448] [--repeats 3] [--build-dir DIR]

Steps, each skipped when its output is already in --build-dir (default
~/.cache/qwen2vl-bench/llama.cpp; delete a file there to redo its step):
1. llama.cpp from the ``llama-cpp-python`` source distribution on PyPI (its ``vendor/llama.cpp``,
   pinned by LLAMA_CPP_PYTHON): pip download, cmake Release with GGML_NATIVE, only llama-bench,
   llama-quantize and llama-mtmd-cli built, at nice 10: about 25 min on 2 shared cores, once.
2. A random bf16 checkpoint (``qwen2vl.bench.random_checkpoint``, seed 0) with the bundled
   tokenizer and the default preprocessor config, converted by the vendored
   ``convert_hf_to_gguf.py`` to a bf16 gguf (quantised by llama-quantize to q8_0 and q4_0) and a
   bf16 mmproj gguf, under <build-dir>/models/2B-<layers>L (about 11 GB at 28 layers; writing the
   checkpoint briefly holds the model in float32, about 13 GB). The converter runs in this
   Python and needs numpy, torch, transformers and sentencepiece there (pip install
   sentencepiece: it is no qwen2vl dependency); gguf-py comes from the vendored tree.
3. A warm-up round, then --rounds rounds, each running in turn llama-bench on bf16, q8_0 and q4_0
   (pp280 and tg<new-tokens>, -r 1, -o json) and qwen2vl bf16, int8 and int4 through the
   Generator that generate() runs (prefill of 280 tokens, then exactly --new-tokens greedy
   tokens, sampling included; the rate counts the new_tokens - 1 forwards). The three qwen2vl
   models are loaded once and kept (about 9 GB at 28 layers); llama-bench maps its gguf per run.
   Each figure is the median over rounds, with the ratio's min-max over rounds beside it.
4. The vision tower on one --image-size image: llama-mtmd-cli's "mtmd batch encoding done in"
   time (the image passed 1 + --repeats times, text between so each is its own batch, the cold
   first dropped) against qwen2vl's ``encode_visual`` (median of --repeats warm runs).

Comparable by construction: the same weights, threads (-t and torch.set_num_threads), prompt
length and token counts. Differences left: llama-bench's tg starts from an empty cache where
qwen2vl's decode follows the 280-token prompt (its KV reads: under 1% of a step's weight reads);
llama-bench's prompt is random token ids, ours plain text; llama.cpp's q4_0 stores the tied
embedding (its output matrix) in q6_K where qwen2vl's int4 keeps lm_head in int8.
At 28 layers and 3 rounds on a quiet 2-core machine: about 15 min after the build (20 min the
first time, with the checkpoint and its conversions); peak memory about 13 GB.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from qwen2vl.bench import (
    bandwidth_over_run,
    bench_inputs,
    decode_rate,
    measure_bandwidth,
    median_time,
    peak_mem,
    peak_mem_reset,
    random_checkpoint,
    timed,
)
from qwen2vl.generation.generate import Generator
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.media.config import MediaConfig
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.processor import load_processor
from qwen2vl.tokenizer import ASSETS_DIR

LLAMA_CPP_PYTHON = "0.3.36"  # its vendor/llama.cpp: ggml-org/llama.cpp of 2026-10-01
TOOLS = ("llama-bench", "llama-quantize", "llama-mtmd-cli")
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",  # deprecated in this version (a warning); kept for older pins
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
)
PROMPT_TOKENS = 280
# qwen2vl's weights -> (qwen2vl's quantize, llama.cpp's type)
VARIANTS = {"bf16": (None, "bf16"), "int8": ("int8", "q8_0"), "int4": ("int4", "q4_0")}
# the targets: qwen2vl / llama.cpp, higher is better
TARGETS = {"decode bf16": 1.2, "decode int8": 1.3, "decode int4": 1.1, "prompt bf16": 1.5}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=28, help="LLM layers of the random 2B model")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated (>= 2)")
    p.add_argument("--threads", type=int, default=2, help="threads of both")
    p.add_argument("--image-size", type=int, default=448, help="square side (448 -> 256 tokens)")
    p.add_argument("--repeats", type=int, default=3, help="timed vision encodes")
    p.add_argument("--build-dir", type=Path, default=Path.home() / ".cache/qwen2vl-bench/llama.cpp")
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens: need at least 2 (the first token ends the prefill)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # qwen2vl's kernel choice
    torch.set_num_threads(args.threads)
    build_dir = args.build_dir.expanduser()
    src = build_llama_cpp(build_dir)
    files = prepare_models(src, build_dir / "models" / f"2B-{args.layers}L", args.layers)
    print(f"threads {args.threads}; torch {torch.__version__}; llama-cpp-python {LLAMA_CPP_PYTHON}")
    peak_mem_reset()  # the peak printed is the measurements', not the checkpoint writing's
    models = load_variants(files.checkpoint)
    samples, reads = measure_rounds(src, files, models, args)
    vision = measure_vision(src, files, models["bf16"], args)
    print_report(samples, vision, args)
    bandwidth_over_run(reads)
    print(f"peak resident memory of this process (three models): {peak_mem() / 1e9:.1f} GB")
    return 0


# ---- build -----------------------------------------------------------------------------------


def shown(cmd: Sequence[object], *, cwd: Path | None = None) -> None:
    """Run cmd with its output on the terminal (the build, quantisation); raise on failure."""
    print("$ " + " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True)


def captured(
    cmd: Sequence[object], *, log: Path | None = None, merge: bool = False, echo: bool = True
) -> str:
    """Run cmd, return its stdout (with stderr when ``merge``); its stderr goes to log when given
    (the converter's is long); on failure raise with the last lines of its stderr."""
    if echo:
        print("$ " + " ".join(map(str, cmd)), flush=True)
    err = subprocess.STDOUT if merge else subprocess.PIPE
    out = subprocess.run([str(c) for c in cmd], text=True, stdout=subprocess.PIPE, stderr=err)
    out.stderr = out.stdout if merge else out.stderr
    if log is not None:
        log.write_text(out.stderr)
    if out.returncode:
        tail = "\n".join(out.stderr.splitlines()[-20:])
        raise RuntimeError(f"exit {out.returncode} of {Path(str(cmd[0])).name}:\n{tail}")
    return out.stdout


def build_llama_cpp(build_dir: Path) -> Path:
    """The vendored llama.cpp source tree, its TOOLS built under build/bin."""
    build_dir.mkdir(parents=True, exist_ok=True)
    sdist = build_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    root = build_dir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    src = root / "vendor" / "llama.cpp"
    if not sdist.exists():
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        shown([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", build_dir])
    if not (src / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(build_dir, filter="data")
    if not (src / "build" / "CMakeCache.txt").exists():
        shown(["nice", "-n", "10", "cmake", "-B", "build", *CMAKE_FLAGS], cwd=src)
    if not all(tool(src, t).exists() for t in TOOLS):
        cmd = ["nice", "-n", "10", "cmake", "--build", "build", "-j", "2", "--target", *TOOLS]
        shown(cmd, cwd=src)
    return src


def tool(src: Path, name: str) -> Path:
    return src / "build" / "bin" / name


# ---- weights ---------------------------------------------------------------------------------


@dataclass
class Files:
    checkpoint: Path
    gguf: dict[str, Path]  # llama.cpp type -> file
    mmproj: Path | None  # None: the converter failed (the reason printed)


def prepare_models(src: Path, out: Path, layers: int) -> Files:
    """The random checkpoint and its ggufs under out, each made once (written under a .part
    name, renamed when whole)."""
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = out / "model"
    if not checkpoint.exists():
        staging = out / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        random_checkpoint("2B", staging, layers)
        add_converter_files(staging / "model")
        (staging / "model").rename(checkpoint)
        staging.rmdir()
    convert = [sys.executable, src / "convert_hf_to_gguf.py", checkpoint, "--outtype", "bf16"]
    gguf = {"bf16": out / "model-bf16.gguf"}
    made(gguf["bf16"], [*convert, "--outfile"], log=out / "convert.log")
    for kind in ("q8_0", "q4_0"):
        gguf[kind] = out / f"model-{kind}.gguf"
        quantize = [tool(src, "llama-quantize"), gguf["bf16"]]
        made(gguf[kind], quantize, kind.upper(), log=out / f"quantize-{kind}.log")
    mmproj = out / "mmproj-bf16.gguf"
    try:
        made(mmproj, [*convert, "--mmproj", "--outfile"], log=out / "mmproj.log")
    except RuntimeError as e:
        print(f"no mmproj, so no llama.cpp vision figure: {e}")
        mmproj = None
    return Files(checkpoint, gguf, mmproj)


def made(path: Path, cmd: list, *after: str, log: Path) -> None:
    """``cmd + [part] + after`` run unless path exists; part (path.part) renamed to path."""
    if path.exists():
        return
    part = path.with_name(path.name + ".part")
    captured([*cmd, part, *after], log=log)
    part.rename(path)


def add_converter_files(checkpoint: Path) -> None:
    """What convert_hf_to_gguf.py reads beside the weights: the bundled tokenizer, and
    preprocessor_config.json (for the mmproj) with qwen2vl's media defaults."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(ASSETS_DIR / name, checkpoint / name)
    media = MediaConfig()
    keys = ("min_pixels", "max_pixels", "patch_size", "merge_size", "temporal_patch_size")
    cfg = {k: getattr(media, k) for k in keys}
    cfg |= {"image_mean": list(media.image_mean), "image_std": list(media.image_std)}
    cfg["image_processor_type"] = "Qwen2VLImageProcessor"
    (checkpoint / "preprocessor_config.json").write_text(json.dumps(cfg, indent=2))


# ---- measurements ----------------------------------------------------------------------------


@dataclass
class Rates:
    prompt: float  # tokens/s over PROMPT_TOKENS
    decode: float  # tokens/s


def parse_llama_bench(stdout: str) -> Rates:
    """Rates of one ``llama-bench -o json`` run with one pp and one tg test."""
    tests = json.loads(stdout)
    pp = [t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0]
    tg = [t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0]
    if len(pp) != 1 or len(tg) != 1:
        raise ValueError(f"expected one pp and one tg test, got {len(tests)} tests")
    return Rates(prompt=pp[0], decode=tg[0])


def llama_bench(src: Path, gguf: Path, *, new_tokens: int, threads: int, echo: bool) -> Rates:
    cmd = [tool(src, "llama-bench"), "-m", gguf, "-p", PROMPT_TOKENS, "-n", new_tokens]
    return parse_llama_bench(captured([*cmd, "-t", threads, "-r", 1, "-o", "json"], echo=echo))


def prompt_batch(checkpoint: Path) -> dict:
    """PROMPT_TOKENS tokens of plain text, no chat template (llama-bench's prompt is raw tokens)."""
    text = " ".join(f"Line {i}: the red cube sits left of a small blue sphere." for i in range(60))
    ids = load_processor(checkpoint).tokenizer.encode(text)[:PROMPT_TOKENS]
    if len(ids) != PROMPT_TOKENS:
        raise ValueError(f"the prompt text gave {len(ids)} tokens, not {PROMPT_TOKENS}")
    ids = torch.tensor([ids])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def qwen2vl_rates(model: Qwen2VL, batch: dict, new_tokens: int) -> Rates:
    """The prefill of ``batch`` alone, then every step of exactly ``new_tokens`` greedy tokens:
    new_tokens samplings and new_tokens - 1 forwards (the last token is never fed), so the
    rate counts forwards."""
    params = SamplingParams(max_new_tokens=new_tokens)
    prefill, gen = timed(lambda: Generator.start(model, batch, params, stop_token_ids=[]))
    seconds, _ = timed(lambda: list(gen))
    n = batch["input_ids"].shape[1]
    return Rates(prompt=n / prefill, decode=decode_rate(gen.n_new - 1, new_tokens - 1, seconds))


def load_variants(checkpoint: Path) -> dict[str, Qwen2VL]:
    """qwen2vl bf16, int8 and int4, loaded once and kept for every round."""
    models = {}
    for name, (quantize, _) in VARIANTS.items():
        load_s, models[name] = timed(
            lambda q=quantize: load_for_inference(checkpoint, "bfloat16", "cpu", quantize=q)
        )
        print(f"qwen2vl {name} loaded in {load_s:.1f} s", flush=True)
    return models


def measure_rounds(
    src: Path, files: Files, models: dict[str, Qwen2VL], args: argparse.Namespace
) -> tuple[dict[str, list[tuple[Rates, Rates]]], list[float]]:
    """For each variant, per round (llama.cpp rates, qwen2vl rates); the bandwidth reads."""
    batch = prompt_batch(files.checkpoint)
    samples: dict[str, list[tuple[Rates, Rates]]] = {name: [] for name in VARIANTS}
    reads = [measure_bandwidth()]
    for r in range(args.rounds + 1):  # round 0 warms both up and is dropped
        theirs = {}
        for name, (_, kind) in VARIANTS.items():
            theirs[name] = llama_bench(
                src, files.gguf[kind], new_tokens=args.new_tokens, threads=args.threads, echo=r == 0
            )
        for name, (_, kind) in VARIANTS.items():
            ours = qwen2vl_rates(models[name], batch, args.new_tokens)
            label = "warm-up" if r == 0 else f"round {r}"
            print(
                f"{label} {name}: llama.cpp {kind} pp {theirs[name].prompt:.1f} tg "
                f"{theirs[name].decode:.2f} tok/s; qwen2vl pp {ours.prompt:.1f} decode "
                f"{ours.decode:.2f} tok/s",
                flush=True,
            )
            if r:
                samples[name].append((theirs[name], ours))
        reads.append(measure_bandwidth())
    return samples, reads


def parse_mtmd_encodes(log: str) -> list[float]:
    """Seconds per image of every media batch llama-mtmd-cli encoded, in order (a batch of n
    images counts n times, each at its time / n)."""
    batches = re.findall(r"n_chunks = (\d+)[^\n]*\n[^\n]*batch encoding done in (\d+) ms", log)
    return [int(ms) / 1e3 / int(n) for n, ms in batches for _ in range(int(n))]


def measure_vision(
    src: Path, files: Files, model: Qwen2VL, args: argparse.Namespace
) -> tuple[float | None, float]:
    """Seconds of one image through the vision tower and merger: (llama.cpp's, None when not
    measured, with the reason printed; qwen2vl's)."""
    size = args.image_size
    batch = bench_inputs(files.checkpoint, size)  # the image of qwen2vl bench
    with torch.inference_mode():
        pv, grid = batch["pixel_values"], batch["image_grid_thw"]
        ours = median_time(lambda: model.encode_visual(pv, grid), args.repeats)
    if files.mmproj is None:
        return None, ours
    n = args.repeats + 1
    with tempfile.TemporaryDirectory(prefix="qwen2vl-llama-cpp-") as tmp:
        image = Path(tmp) / "image.png"
        rng = np.random.default_rng(0)  # as bench_inputs draws it
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(image)
        # text between the images keeps each in its own encode batch
        prompt = " ".join(f"<__media__> Image {i}." for i in range(n))
        cmd = [tool(src, "llama-mtmd-cli"), "-m", files.gguf["q4_0"], "--mmproj", files.mmproj]
        cmd += ["--image", ",".join([str(image)] * n), "-p", prompt, "-n", 1, "--temp", 0]
        # --no-warmup: its warm-up encodes a 2116-token image, minutes on a CPU
        log = captured([*cmd, "-t", args.threads, "-c", 4096, "--no-warmup"], merge=True)
    encodes = parse_mtmd_encodes(log)
    if len(encodes) != n:
        print(f"llama-mtmd-cli: {len(encodes)} image encodes found in its log, not {n}")
        return None, ours
    return statistics.median(encodes[1:]), ours  # the first, cold, dropped


# ---- report ----------------------------------------------------------------------------------


def print_report(
    samples: dict[str, list[tuple[Rates, Rates]]],
    vision: tuple[float | None, float],
    args: argparse.Namespace,
) -> None:
    rounds = len(samples["bf16"])
    print(
        f"\n{args.layers} LLM layers, {args.threads} threads, medians over {rounds} rounds after "
        f"a warm-up; ratio = qwen2vl / llama.cpp, its min-max over rounds"
    )
    print(f"{'tok/s':<32} {'llama.cpp':>9} {'qwen2vl':>9} {'ratio':>6} {'min-max':>10}  target")
    rows = [
        (f"decode {name}", f"{name} vs {kind}", name, "decode")
        for name, (_, kind) in VARIANTS.items()
    ]
    rows.append(("prompt bf16", f"bf16 vs bf16, {PROMPT_TOKENS} tokens", "bf16", "prompt"))
    for target, what, name, field in rows:
        theirs = [getattr(t, field) for t, _ in samples[name]]
        ours = [getattr(o, field) for _, o in samples[name]]
        ratios = [o / t for t, o in zip(theirs, ours, strict=True)]
        ratio = statistics.median(ours) / statistics.median(theirs)
        goal = TARGETS[target]
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(
            f"{field + ' ' + what:<32} {statistics.median(theirs):>9.2f} "
            f"{statistics.median(ours):>9.2f} {ratio:>5.2f}x {spread:>10}  >= {goal}x "
            f"{'met' if ratio >= goal else 'NOT met'}"
        )
    side = f"{args.image_size}x{args.image_size}"
    theirs, ours = vision
    if theirs is None:
        print(f"{'vision s, ' + side + ' bf16':<32} {'-':>9} {ours:>9.3f}  (llama.cpp: see above)")
        return
    print(
        f"{'vision s, ' + side + ' bf16':<32} {theirs:>9.3f} {ours:>9.3f} {theirs / ours:>5.2f}x"
        "  (a speed ratio: llama.cpp's time / qwen2vl's)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
