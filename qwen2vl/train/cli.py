"""`qwen2vl train` and `python -m qwen2vl.train` (also under torchrun): flags over a config file.

qwen2vl train --model DIR --data train.jsonl --stage 3 --output OUT [--lora] [...]
qwen2vl train --config run.yaml --max-steps 100          # flags override the file
torchrun --nproc-per-node 2 -m qwen2vl.train --config run.yaml --strategy fsdp
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from qwen2vl.errors import Qwen2VLError

S = argparse.SUPPRESS  # an option not given leaves the config file's value (or the default)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The train options (names as in TrainConfig and the config file)."""
    flag = argparse.BooleanOptionalAction
    p.add_argument("--config", default=None, help="YAML/TOML/JSON file with any of these options")
    p.add_argument("--model", default=S, help="source checkpoint directory (Hugging Face layout)")
    p.add_argument("--data", default=S, help="JSONL file, one conversation per line")
    p.add_argument("--output", default=S, help="output directory (final model, checkpoints)")
    p.add_argument(
        "--stage",
        type=int,
        choices=[1, 2, 3],
        default=S,
        help="1: ViT+merger; 2: all; 3: LLM+merger (default 3)",
    )
    p.add_argument(
        "--freeze",
        default=S,
        help="comma list of module prefixes frozen instead of "
        "the stage's, e.g. visual,model.embed_tokens ('' freezes nothing)",
    )
    p.add_argument("--lora", action=flag, default=S, help="LoRA adapters, merged when saved")
    p.add_argument("--lora-rank", type=int, default=S)
    p.add_argument("--lora-alpha", type=float, default=S)
    p.add_argument("--lora-dropout", type=float, default=S)
    p.add_argument("--lora-targets", default=S, help="comma list of llm, vit (default llm)")
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--max-steps", type=int, default=S, help="optimizer steps (wins over epochs)")
    p.add_argument("--lr", type=float, default=S, help="peak learning rate (default 1e-5)")
    p.add_argument("--min-lr", type=float, default=S, help="end of the cosine (default 0)")
    p.add_argument("--warmup-steps", type=int, default=S)
    p.add_argument("--weight-decay", type=float, default=S)
    p.add_argument("--grad-clip", type=float, default=S, help="max grad norm; 0 disables")
    p.add_argument(
        "--grad-accum", type=int, default=S, help="packed rows per process per optimizer step"
    )
    p.add_argument("--max-tokens", type=int, default=S, help="tokens per packed row")
    p.add_argument("--too-long", choices=["shrink", "drop"], default=S)
    p.add_argument("--max-pixels", type=int, default=S, help="pixel cap per image/video frame")
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--resume", default=S, help="checkpoint directory, or 'auto' for the latest")
    p.add_argument("--gradient-checkpointing", action=flag, default=S)
    p.add_argument("--bf16", action=flag, default=S, help="bf16 autocast (fp32 weights)")
    p.add_argument("--save-every", type=int, default=S, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int, default=S)
    p.add_argument("--save-dtype", choices=["float32", "bfloat16", "float16"], default=S)
    p.add_argument("--validate-only", action=flag, default=S, help="check the data and stop")
    p.add_argument("--on-bad-line", choices=["stop", "skip"], default=S)
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default=S, help="under torchrun")
    p.add_argument("--device", default=S, help="auto, cpu or cuda")
    p.add_argument("--log-every", type=int, default=S)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    _setup_logging()
    from qwen2vl.train.config import load_config
    from qwen2vl.train.loop import train, validate

    options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "config")}
    try:
        cfg = load_config(args.config, **options)
        cfg.require_paths()
        if cfg.validate_only:
            _, report = validate(cfg)
            print(report.summary(cfg.data), file=sys.stderr)
            return 0
        result = train(cfg)
    except Qwen2VLError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        last = f", last loss {result.losses[-1]:.4f}" if result.losses else ""
        print(f"trained {result.steps} steps{last}; model in {result.output}", file=sys.stderr)
    return 0


def _setup_logging() -> None:
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
