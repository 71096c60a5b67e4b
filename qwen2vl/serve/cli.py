"""`qwen2vl serve`: arguments, model loading, and uvicorn.

    qwen2vl serve [--model DIR] [--host 127.0.0.1 --port 8000 --api-key KEY --max-num-seqs 8
                  --device auto --dtype auto --limit-mm-per-prompt image=8,video=2
                  --allowed-local-media-path DIR --allow-remote-media --max-model-len N ...]
    torchrun --nproc-per-node N -m qwen2vl serve --model DIR --tensor-parallel-size N ...

Under tensor parallelism rank 0 runs the HTTP server and the engine; the other ranks load their
shards and replay rank 0's model calls (serve/runner.py) until it stops. A lost rank makes rank 0
answer 503 and exit (status 1).

``add_arguments(parser)`` gives the main CLI (qwen2vl/cli.py) its options and sets ``run``.
Every argument value and the `serve` extra's packages are checked before any weights are read.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import torch

from qwen2vl.devices import add_placement_arguments, int_at_least, resolve_device, resolve_dtype
from qwen2vl.errors import Qwen2VLError

DEFAULT_MAX_MODEL_LEN = 8192  # the KV slots are preallocated: slots x 1.5 x this many tokens


HELP = "OpenAI-compatible HTTP server with continuous batching and a chat page"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (Hugging Face layout); default: the embedded tiny model",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("QWEN2VL_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1 (default: $QWEN2VL_API_KEY)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients send as 'model' (default: the directory's name)",
    )
    add_placement_arguments(p)
    p.add_argument("--max-num-seqs", type=_positive, default=8, help="sequences decoded together")
    p.add_argument(
        "--max-model-len",
        type=_positive,
        default=None,
        help=f"prompt + completion tokens (default: the model's, at most {DEFAULT_MAX_MODEL_LEN})",
    )
    p.add_argument(
        "--max-queue", type=_positive, default=64, help="requests waiting for a slot before 429"
    )
    p.add_argument(
        "--prefill-chunk",
        type=_positive,
        default=256,
        help="prompt tokens per prefill step between decode steps",
    )
    p.add_argument(
        "--limit-mm-per-prompt",
        type=_limits,
        default={"image": 8, "video": 2},
        help="media per prompt, e.g. image=8,video=2 (or JSON)",
    )
    p.add_argument(
        "--allowed-local-media-path",
        default=None,
        help="serve image/video file paths and file:// URLs under this directory",
    )
    p.add_argument("--allow-remote-media", action="store_true", help="fetch http(s) media")
    p.add_argument(
        "--max-image-pixels",
        type=_positive,
        default=50_000_000,
        help="largest image (width x height, read from its header) decoded; larger ones are 400",
    )
    p.add_argument(
        "--max-video-frame-pixels",
        type=_positive,
        default=4096 * 4096,
        help="largest video frame (width x height, from the header) decoded",
    )
    p.add_argument(
        "--max-pixels",
        type=_positive,
        default=None,
        help="per-part min_pixels/max_pixels/resized size are clamped to this "
        "(default: the checkpoint's max_pixels)",
    )
    p.add_argument(
        "--max-tokens-default",
        type=_positive,
        default=2048,
        help="completion tokens of a request that sets no max_tokens",
    )
    p.add_argument(
        "--request-timeout", type=_positive_number, default=600.0, help="seconds per request"
    )
    p.add_argument(
        "--max-body-mb", type=_positive_number, default=64.0, help="request body limit (413)"
    )
    p.add_argument("--encoder-cache-items", type=_count, default=64, help="vision features kept")
    p.add_argument(
        "--prefix-cache-mb",
        type=_non_negative_number,
        default=1024.0,
        help="keys/values of prompt prefixes kept across requests, in MiB (0: none)",
    )
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])  # fmt: skip
    p.set_defaults(run=run)


_positive, _count = int_at_least(1), int_at_least(0)


def _port(text: str) -> int:
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port in [0, 65535], got {text!r}")
    return value


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _limits(text: str) -> dict[str, int]:
    try:
        pairs = (
            json.loads(text)
            if text.strip().startswith("{")
            else dict(item.split("=", 1) for item in text.split(",") if item.strip())
        )
        limits = {k.strip(): int(v) for k, v in pairs.items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise argparse.ArgumentTypeError(f"expected image=N,video=M, got {text!r}") from e
    unknown = set(limits) - {"image", "video"}
    if unknown or any(v < 0 for v in limits.values()):
        raise argparse.ArgumentTypeError(f"expected image=N,video=M (N, M >= 0), got {text!r}")
    return {"image": 8, "video": 2} | limits


def build_app(args: argparse.Namespace):
    """Check every value, then load the model; the FastAPI app (the engine starts with it).
    Under tensor parallelism, rank 0's: its engine leads the other ranks."""
    from qwen2vl.processor import load_processor
    from qwen2vl.serve.app import create_app
    from qwen2vl.serve.engine import Engine
    from qwen2vl.serve.prepare import generation_config
    from qwen2vl.serve.runner import Leader

    path, max_len, engine_config, load = _checked(args)
    defaults, eos = generation_config(path)
    config = _server_config(args, path, max_len, defaults)
    processor = load_processor(path, access=media_access(args), max_model_len=max_len)
    model = load()
    leader = Leader() if args.tensor_parallel_size > 1 else None
    runner = engine_config.runner(model, leader)
    engine = Engine(model, processor, engine_config, stop_token_ids=eos, runner=runner)
    return create_app(engine, config)


def _checked(args: argparse.Namespace):
    """Every value checked before any weight is read: (checkpoint, model length, engine
    config, a function that loads this process's model)."""
    from qwen2vl.config import Qwen2VLConfig
    from qwen2vl.default_model import model_or_default
    from qwen2vl.generation.load import load_for_inference
    from qwen2vl.serve.engine import EngineConfig

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, cpu=torch.bfloat16)
    path = model_or_default(args.model)
    native = Qwen2VLConfig.from_file(path / "config.json").text.max_position_embeddings
    max_len = args.max_model_len or min(native, DEFAULT_MAX_MODEL_LEN)
    engine_config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_model_len=max_len,
        max_queue=args.max_queue,
        prefill_chunk=args.prefill_chunk,
        encoder_cache_items=args.encoder_cache_items,
        prefix_cache_mb=args.prefix_cache_mb,
    )
    tp = args.tensor_parallel_size

    def load():
        return load_for_inference(
            path, dtype, device, quantize=args.quantize, tensor_parallel_size=tp
        )

    return path, max_len, engine_config, load


def follow_leader(args: argparse.Namespace) -> int:
    """A tensor-parallel rank other than 0: load this rank's shard, then replay rank 0's
    model calls until rank 0 stops (0) or is lost (1)."""
    from qwen2vl.serve.runner import RankLost, follow

    _, _, engine_config, load = _checked(args)
    runner = engine_config.runner(load())
    try:
        follow(runner)
    except RankLost as e:
        logging.getLogger(__name__).error("%s (%s); this rank stops", e, e.__cause__)
        return 1
    except KeyboardInterrupt:  # Ctrl-C reaches every rank torchrun started
        return 0
    return 0


def _server_config(args: argparse.Namespace, path: Path, max_len: int, defaults: dict):
    from qwen2vl.serve.app import ServerConfig
    from qwen2vl.serve.prepare import Limits

    limits = args.limit_mm_per_prompt
    return ServerConfig(
        model_name=args.served_model_name or path.resolve().name,
        aliases=tuple(a for a in (args.model, str(path.resolve())) if a),
        limits=Limits(
            max_len,
            limits["image"],
            limits["video"],
            args.request_timeout,
            max_tokens_default=args.max_tokens_default,
            max_pixels=args.max_pixels,
        ),
        api_key=args.api_key,
        defaults=defaults,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
    )


def media_access(args: argparse.Namespace):
    """What clients may make the server read: local files only under the named directory."""
    from qwen2vl.media import MediaAccess

    local = args.allowed_local_media_path
    return MediaAccess(
        allow_local=local is not None,
        local_dir=local,
        allow_remote=args.allow_remote_media,
        max_image_pixels=args.max_image_pixels,
        max_frame_pixels=args.max_video_frame_pixels,
        how_to_allow_local="start the server with --allowed-local-media-path DIR to serve "
        "files under DIR",
        how_to_allow_remote="start the server with --allow-remote-media",
    )


def require_packages() -> None:
    """The `serve` extra, named in one line rather than an ImportError from deep in the app."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError:
        raise Qwen2VLError(
            'qwen2vl serve needs fastapi and uvicorn: pip install "qwen2vl[serve]"',
            code="missing_package",
        ) from None


def run(args: argparse.Namespace) -> int:
    require_packages()  # before anything is loaded
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.tensor_parallel_size > 1 and os.environ.get("RANK", "0") != "0":
        return follow_leader(args)
    app = build_app(args)
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    )
    app.state.engine.on_lost = lambda: setattr(server, "should_exit", True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C it held after a clean shutdown
        pass
    return 1 if app.state.engine.lost else 0
