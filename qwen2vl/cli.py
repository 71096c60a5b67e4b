"""The command line: the only argv reader. Each command is a thin layer over the Python API.

qwen2vl --version
qwen2vl demo [--model DIR] [--out DIR]
qwen2vl chat [--model DIR] [--device auto] [--image PATH]... [--video PATH]... ["question"]
qwen2vl eval [--model DIR] [--n N] [--tasks TASK...]          the synthetic tasks
qwen2vl eval --data FILE.jsonl --metric exact|vqa|anls|iou|choice [--model DIR] [--answers OUT]
qwen2vl run --data requests.jsonl --output answers.jsonl [--model DIR] [...]   (qwen2vl run --help)
qwen2vl tokens [--model DIR] [--image PATH]... [--video PATH]... [FILE...]
qwen2vl serve [--model DIR] [...]   (qwen2vl serve --help)
qwen2vl train [...]                 (qwen2vl train --help)
qwen2vl init ARCH_DIR --output DIR [--seed N] [--std fan-in|F] [--embed-std F]
qwen2vl bench [...]                 (qwen2vl bench --help)
qwen2vl quantize --output DIR --bits 8|4 [--model DIR]   a checkpoint that loads quantised
qwen2vl plan-memory [--models 2B 7B 72B] [--tp 1 2 4 8] [--context N]   memory per device
qwen2vl synth-data --out DIR [...]  the synthetic world's data (qwen2vl synth-data --help)
qwen2vl build-default-model [BUILD_DIR] [--scale S]   the default model's recipe

Without --model, demo, chat, eval and serve use the embedded default model (a tiny Qwen2-VL
trained on this project's synthetic world).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from qwen2vl.default_model import DEFAULT_MODEL_DIR, default_model_notice, model_or_default
from qwen2vl.devices import add_placement_arguments
from qwen2vl.errors import Qwen2VLError


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except Qwen2VLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def parser() -> argparse.ArgumentParser:
    """Every subcommand; a module that owns one gives `add_arguments(p)`, which sets its run."""
    from qwen2vl import bench, plan_memory, quantize_cli
    from qwen2vl import run as batch
    from qwen2vl.serve import cli as serve
    from qwen2vl.synth import build
    from qwen2vl.synth import dataset as synth_data
    from qwen2vl.train import cli as train

    p = argparse.ArgumentParser(
        prog="qwen2vl", description="Qwen2-VL and Qwen2.5-VL in plain PyTorch."
    )
    p.add_argument("--version", action="version", version=f"qwen2vl {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    commands = [
        ("demo", _demo_parser, "run the default model on fresh synthetic scenes"),
        ("chat", _chat_parser, "chat about images and videos (one shot or REPL)"),
        ("eval", _eval_parser, "score a model on your JSONL data or the synthetic tasks"),
        ("run", batch.add_arguments, batch.HELP),
        ("tokens", _tokens_parser, "what images/videos will cost, before running"),
        ("serve", serve.add_arguments, serve.HELP),
        ("train", train.add_arguments, "fine-tune: stages, LoRA, packing, torchrun"),
        ("init", _init_parser, "a new model with random weights (to train)"),
        ("bench", bench.add_arguments, "measure qwen2vl's speed and memory"),
        ("quantize", quantize_cli.add_arguments, quantize_cli.HELP),
        ("plan-memory", plan_memory.add_arguments, plan_memory.HELP),
        ("synth-data", synth_data.add_arguments, "write a synthetic data set (JSONL + media)"),
        ("build-default-model", build.add_arguments, "rebuild the embedded default model"),
    ]
    for name, add, text in commands:
        add(sub.add_parser(name, help=text, description=text))
    return p


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen2vl")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _model_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (Hugging Face layout); default: the embedded tiny model",
    )


# ---- demo and eval ---------------------------------------------------------------------------


def _demo_parser(p: argparse.ArgumentParser) -> None:
    _model_option(p)
    p.add_argument("--out", default="qwen2vl-demo", help="where the scenes and pictures go")
    p.add_argument("--seed", type=int, default=None, help="other scenes (default: the demo's)")
    p.set_defaults(run=_demo)


def _demo(args: argparse.Namespace) -> int:
    from qwen2vl.generation.pipeline import Pipeline
    from qwen2vl.synth.demo import DEMO_SEED, format_answer, run_demo

    path = model_or_default(args.model)
    print(f"model: {path}", flush=True)
    pipe = Pipeline.from_pretrained(path, dtype="float32")
    t = time.perf_counter()
    answers, picture = run_demo(
        pipe,
        args.out,
        seed=DEMO_SEED if args.seed is None else args.seed,
        show=lambda a: print(format_answer(a), flush=True),
    )
    right = sum(a.correct for a in answers)
    print(
        f"{right}/{len(answers)} right in {time.perf_counter() - t:.1f} s; scenes in "
        f"{args.out}/, grounding answers drawn in {picture}"
    )
    return 0


def _eval_parser(p: argparse.ArgumentParser) -> None:
    from qwen2vl import eval as data_eval
    from qwen2vl.run import add_engine_arguments
    from qwen2vl.synth.eval import EVAL_SEED
    from qwen2vl.synth.tasks import ALL_TASKS

    p.description = data_eval.__doc__.split("\n\n", 1)[0] + "\n\n" + _EVAL_USAGE
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--data", default="synth", help="a JSONL data file, or synth (the default)")
    p.add_argument("--metric", choices=list(data_eval.METRICS), help="how a data file is scored")
    add_engine_arguments(p, dtype="float32")
    p.add_argument("--answers", default=None,
                   help="write every reply to this JSONL file (with --data FILE: FILE's name "
                   "with .METRIC.jsonl, by default)")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=128, help="--data FILE: tokens per reply")
    p.add_argument("--n", type=int, default=200, help="synth: held-out samples per task")
    p.add_argument("--seed", type=int, default=EVAL_SEED, help="synth: the held-out set's seed")
    p.add_argument("--tasks", nargs="+", default=list(ALL_TASKS), choices=ALL_TASKS)
    p.add_argument("--batch-size", type=int, default=32, help="synth: samples per batch")
    p.set_defaults(run=_eval)


_EVAL_USAGE = """data line: {"id", "messages": [..., {"role": "assistant", "content": REFERENCE}]}
      or   {"id", "messages": [...], "answers": [REFERENCE, ...], "options": [...]?}
metrics:   exact (whitespace/case aside), vqa (VQA accuracy, official normalisation),
           anls (DocVQA, threshold 0.5), iou (a box with IoU >= 0.5, in the model's frame),
           choice (the option letter: "The answer is (B)", "b) cat")
without --data (or --data synth): the held-out synthetic tasks (--n, --seed, --tasks)"""


def _eval(args: argparse.Namespace) -> int:
    if args.data != "synth":
        return _eval_data(args)
    if args.metric is not None:
        print("error: --metric scores a data file (--data FILE)", file=sys.stderr)
        return 2
    return _eval_synth(args)


def _eval_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qwen2vl import eval as data_eval
    from qwen2vl.run import engine_from, progress_bar

    if args.metric is None or args.max_tokens < 1:
        print("error: --data FILE needs --metric, and --max-tokens >= 1", file=sys.stderr)
        return 2
    data = Path(args.data)
    if not data.is_file():
        print(f"error: {data}: no such data file", file=sys.stderr)
        return 2
    results = args.answers or str(data.with_suffix(f".{args.metric}.jsonl"))
    engine = engine_from(args)
    t = time.perf_counter()
    scores = data_eval.evaluate_file(
        engine,
        data,
        args.metric,
        max_tokens=args.max_tokens,
        results=results,
        progress=progress_bar("evaluating"),
    )
    print(f"model: {model_or_default(args.model)}\ngreedy, at most {args.max_tokens} tokens\n")
    print(data_eval.format_table([scores]))
    print(f"\nper-sample results in {results} ({time.perf_counter() - t:.1f} s)")
    return 0


def _eval_synth(args: argparse.Namespace) -> int:
    from qwen2vl.devices import resolve_device, resolve_dtype
    from qwen2vl.generation.pipeline import Pipeline
    from qwen2vl.synth.eval import evaluate, format_table, write_answers

    if args.n < 1 or args.batch_size < 1:
        print("error: --n and --batch-size must be >= 1", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    path = model_or_default(args.model)
    pipe = Pipeline.from_pretrained(path, dtype=dtype, device=device, quantize=args.quantize)
    answers: list = []
    t = time.perf_counter()
    scores = evaluate(
        pipe,
        n_per_task=args.n,
        seed=args.seed,
        tasks=args.tasks,
        batch_size=args.batch_size,
        progress=_progress_bar("evaluating"),
        answers=answers,
    )
    print(f"model: {path}\nheld-out seed {args.seed}, {args.n} samples per task, greedy\n")
    print(format_table(scores))
    print(f"\n{len(answers)} answers in {time.perf_counter() - t:.1f} s")
    if args.answers:
        write_answers(answers, args.answers)
    return 0


# ---- init ------------------------------------------------------------------------------------


def _init_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("architecture", help="directory with config.json (+ processor files)")
    p.add_argument("--output", required=True, help="the new checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--std",
        type=_std,
        default=0.02,
        help="std of the weight matrices, or 'fan-in' for 1/sqrt(fan_in) each (default: 0.02, "
        "as transformers)",
    )
    p.add_argument("--embed-std", type=float, default=None, help="std of the embeddings")
    p.set_defaults(run=_init)


def _std(text: str) -> float | None:
    if text == "fan-in":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'fan-in', not {text!r}") from None


def _init(args: argparse.Namespace) -> int:
    from qwen2vl.train.init import write_initial

    try:  # init_model checks the stds before anything is written
        out = write_initial(
            args.architecture,
            args.output,
            seed=args.seed,
            std=args.std,
            embed_std=args.embed_std,
        )
    except (ValueError, OSError, Qwen2VLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a new model (seed {args.seed}) to {out}")
    return 0


# ---- chat ------------------------------------------------------------------------------------


def _chat_parser(p: argparse.ArgumentParser) -> None:
    _model_option(p)
    p.add_argument("--image", action="append", default=[], help="image path/URL (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video path (repeatable)")
    add_placement_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--allow-remote-media", action="store_true", help="allow http(s) media")
    p.add_argument("prompt", nargs="?", help="ask once and exit; without it, an interactive chat")
    p.set_defaults(run=_chat)


def _chat(args: argparse.Namespace) -> int:
    from qwen2vl.generation.pipeline import Pipeline
    from qwen2vl.processor import load_processor

    path, device, dtype, access, sampling = _chat_checked(args)
    tp, main = args.tensor_parallel_size, os.environ.get("RANK", "0") == "0"
    if tp > 1 and args.prompt is None:
        raise Qwen2VLError("--tensor-parallel-size: give the question as an argument")
    if tp > 1:  # each rank logs the memory its shard takes
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not main:  # under torchrun every rank runs the same chat; rank 0 prints it
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115
    if path == DEFAULT_MODEL_DIR and main:
        print(default_model_notice("qwen2vl chat"), file=sys.stderr)
    system = [{"role": "system", "content": args.system}] if args.system else []
    media = _media_parts(args.image, args.video)
    text = [] if args.prompt is None else [{"type": "text", "text": args.prompt}]
    first = system + [{"role": "user", "content": media + text}]
    processor = load_processor(path, access=access)
    if media or text:  # the plan reads media headers, no pixels: bad media fail before weights
        processor.plan(first)
    pipe = Pipeline.from_pretrained(
        path,
        dtype=dtype,
        quantize=args.quantize,
        device=device,
        progress=_progress_bar("loading weights") if main else None,
        processor=processor,
        tensor_parallel_size=tp,
    )
    if args.prompt is not None:
        _answer(pipe, first, sampling)
        return 0
    return _chat_loop(pipe, system, media, sampling)


def _chat_checked(args: argparse.Namespace):
    """Everything chat needs before its weights are read, each value checked (raises
    Qwen2VLError): (checkpoint, device, dtype, media access, sampling keywords)."""
    import torch

    from qwen2vl.devices import resolve_device, resolve_dtype
    from qwen2vl.generation.sampling import SamplingParams
    from qwen2vl.media import MediaAccess

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, cpu=torch.bfloat16)
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )
    SamplingParams(**sampling)  # raises SamplingError naming the bad value
    access = MediaAccess(
        allow_remote=args.allow_remote_media, how_to_allow_remote="pass --allow-remote-media"
    )
    return model_or_default(args.model), device, dtype, access, sampling


def _chat_loop(pipe, system: list, media: list, sampling: dict[str, Any]) -> int:
    print(
        "Interactive chat. /image PATH and /video PATH attach media to your next message; "
        "/reset starts over; /quit or Ctrl-D ends.",
        file=sys.stderr,
    )
    messages = list(system)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            return 0
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            messages, media = list(system), []
        elif line.startswith(("/image ", "/video ")):
            kind, path = line[1:].split(" ", 1)
            media += _media_parts(*(([path], []) if kind == "image" else ([], [path])))
        elif line:
            messages.append({"role": "user", "content": media + [{"type": "text", "text": line}]})
            media = []
            try:
                messages.append({"role": "assistant", "content": _answer(pipe, messages, sampling)})
            except Qwen2VLError as e:
                messages.pop()
                print(f"error: {e}", file=sys.stderr)


def _progress_bar(label: str):
    def show(done: int, total: int) -> None:
        if sys.stderr.isatty() or done == total:
            filled = 30 * done // total
            end = "\n" if done == total else ""
            print(
                f"\r{label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}",
                end=end,
                file=sys.stderr,
                flush=True,
            )

    return show


def _answer(pipe, messages: list[dict[str, Any]], sampling: dict[str, Any]) -> str:
    text = ""
    for delta in pipe.chat(messages, stream=True, **sampling):
        text += delta
        print(delta, end="", flush=True)
    print()
    return text


def _media_parts(images: Sequence[str], videos: Sequence[str]) -> list[dict[str, Any]]:
    return [{"type": "image", "image": i} for i in images] + [
        {"type": "video", "video": v} for v in videos
    ]


# ---- tokens ----------------------------------------------------------------------------------


def _tokens_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("files", nargs="*", help="images or videos (kind from the file suffix)")
    p.add_argument("--image", action="append", default=[], help="image path (repeatable)")
    p.add_argument("--video", action="append", default=[], help="video path (repeatable)")
    p.add_argument("--model", default=None, help="checkpoint whose preprocessor settings apply")
    p.add_argument("--min-pixels", type=int, default=None)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--fps", type=float, default=None, help="video sampling rate")
    p.add_argument("--nframes", type=int, default=None, help="video frame count (instead of fps)")
    p.add_argument("--max-video-tokens", type=int, default=None, help="hard token cap per video")
    p.set_defaults(run=_tokens)


VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif")


def _tokens(args: argparse.Namespace) -> int:
    from qwen2vl.processor import load_processor

    proc = load_processor(model_or_default(args.model) if args.model else None)
    images = list(args.image) + [f for f in args.files if not f.lower().endswith(VIDEO_SUFFIXES)]
    videos = list(args.video) + [f for f in args.files if f.lower().endswith(VIDEO_SUFFIXES)]
    if not images and not videos:
        print("error: give at least one image or video", file=sys.stderr)
        return 2
    overrides = {
        k: v
        for k, v in (("min_pixels", args.min_pixels), ("max_pixels", args.max_pixels))
        if v is not None
    }
    video_keys = {
        k: v
        for k, v in (
            ("fps", args.fps),
            ("nframes", args.nframes),
            ("max_tokens", args.max_video_tokens),
        )
        if v is not None
    }
    parts = [{"type": "image", "image": i, **overrides} for i in images]
    parts += [{"type": "video", "video": v, **overrides, **video_keys} for v in videos]
    plan = proc.plan([{"role": "user", "content": parts}])
    print(
        f"{'item':<40} {'size':>11} {'resized':>11} {'grid t×h×w':>12} {'frames':>6} {'tokens':>7}"
    )
    for v in plan.visuals:
        p = v.plan
        name = str(v.part.get("image") or v.part.get("video"))[-40:]
        frames = len(p.frame_indices) if v.kind == "video" else 1
        print(
            f"{name:<40} {p.width:>5}×{p.height:<5} {p.resized_width:>5}×{p.resized_height:<5} "
            f"{'×'.join(map(str, v.grid_thw)):>12} {frames:>6} {v.tokens:>7}"
        )
        if v.kind == "video":
            stamps = ", ".join(f"{t:.2f}" for t in p.timestamps[:12])
            more = " ..." if len(p.timestamps) > 12 else ""
            capped = " (token cap applied)" if p.capped else ""
            print(f"    timestamps (s): {stamps}{more}{capped}")
    limit = f" of {plan.max_model_len}" if plan.max_model_len else ""
    print(
        f"prompt tokens: {plan.prompt_tokens}{limit} "
        f"(visual {plan.prompt_tokens - plan.text_tokens}, text {plan.text_tokens})"
    )
    return 0 if plan.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
