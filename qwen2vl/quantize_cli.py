"""``qwen2vl quantize``: write a checkpoint with int8 or int4 weights once, so that every command
loads it (``--model Q``) memory-mapped, with no re-quantising at each start.

    qwen2vl quantize [--model DIR] --output DIR --bits 8|4 [--dtype bfloat16]

The format (safetensors plus config.json's ``quantization_config``) is described in
``qwen2vl/generation/quantized_checkpoint.py``; the tokenizer, chat template and processor files
are copied beside it. transformers does not load the result.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from qwen2vl.default_model import model_or_default
from qwen2vl.errors import CheckpointError
from qwen2vl.generation.quantized_checkpoint import save_quantized, stored_quantization
from qwen2vl.hub import resolve_model

HELP = "write an int8 or int4 checkpoint that loads without re-quantising"
# Everything besides weights and config.json that a model directory needs to chat.
PROCESSOR_FILES = (
    "tokenizer*.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.*",
    "*preprocessor_config.json",
    "generation_config.json",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default=None, help="checkpoint directory or repo id (default: the tiny model)"
    )
    p.add_argument("--output", required=True, help="the quantised checkpoint directory")
    p.add_argument("--bits", type=int, choices=[8, 4], required=True, help="8: int8; 4: int4")
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="dtype of the tensors left unquantised: embeddings, norms, the vision tower",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    source = resolve_model(model_or_default(args.model))
    output = Path(args.output)
    if output.resolve() == Path(source).resolve():
        raise CheckpointError(f"--output {output} is the source checkpoint: choose another")
    stored = stored_quantization(source)  # refuses other tools' quantised checkpoints
    if stored:
        raise CheckpointError(f"{source} is already quantised ({stored})")
    start = time.perf_counter()
    save_quantized(source, output, bits=args.bits, dtype=args.dtype)
    copy_processor_files(Path(source), output)
    size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
    print(
        f"wrote an int{args.bits} checkpoint to {output} ({size / 2**20:.1f} MiB of weights, "
        f"{time.perf_counter() - start:.1f} s); load it with --model {output}"
    )
    return 0


def copy_processor_files(source: Path, output: Path) -> None:
    """The source's tokenizer, template and processor files (symbolic links followed)."""
    for pattern in PROCESSOR_FILES:
        for f in source.glob(pattern):
            if f.is_file() and f.name != "config.json":
                shutil.copyfile(f, output / f.name)
