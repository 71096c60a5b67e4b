"""What each released Qwen2-VL and Qwen2.5-VL needs on each device: weights per device by
tensor-parallel degree and storage (bf16 / int8; int4 is not planned yet), plus the KV cache of a
context, computed from the configs.

    qwen2vl plan-memory [--models 2B 7B 72B] [--tp 1 2 4 8] [--context 32768] [--batch 1]
                        [--markdown]   (per-device totals only, one column per TP degree)

Each tensor's bytes on one device follow the loader's rules (generation/tensor_parallel.py):
split tensors take 1/N (the vocabulary ceil(V/N) rows), norms and the ViT are whole on every
device; int8 stores the LLM's linears and lm_head as int8 with a float32 scale per output row
(quantize.py), a tied lm_head becoming its own int8 copy beside the bf16 embedding; everything
else stays bf16. The KV cache is bf16: 2 x layers x kv heads/N x head dim x tokens x sequences.
Activations and the allocator's slack come on top (a few percent at batch 1). Prints a table.
"""

from __future__ import annotations

import argparse
import math

import torch

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import ConfigError
from qwen2vl.generation.quantize import LLM_LINEARS
from qwen2vl.generation.tensor_parallel import shard_config, split_dim
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.presets import PRESETS, preset

HELP = "what each model size needs per device (weights by TP degree, KV cache)"
GIB = 2**30
BF16 = 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4, 8], help="tensor-parallel sizes")
    p.add_argument("--context", type=int, default=32768, help="tokens of KV cache per sequence")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument(
        "--markdown", action="store_true", help="a Markdown table of per-device totals by TP degree"
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.markdown:
        return markdown(args)
    print(
        f"Per-device memory (GiB): LLM shard + whole ViT + bf16 KV cache of {args.batch} x "
        f"{args.context} tokens; activations not included"
    )
    print(f"{'model':<8} {'weights':<8} {'TP':>3} {'LLM':>8} {'ViT':>6} {'KV':>7} {'total':>8}")
    for name in args.models:
        cfg = preset(name)
        shapes = tensor_shapes(cfg)
        for storage in ("bf16", "int8"):
            for n in args.tp:
                print(f"{name:<8} {storage:<8} {n:>3} " + row(cfg, shapes, storage, n, args))
    return 0


def markdown(args: argparse.Namespace) -> int:
    print(f"| model | weights | {' | '.join(f'TP {n}' for n in args.tp)} |")
    print("|---|---|" + "---|" * len(args.tp))
    for name in args.models:
        cfg = preset(name)
        shapes = tensor_shapes(cfg)
        for storage in ("bf16", "int8"):
            cells = [total(cfg, shapes, storage, n, args) for n in args.tp]
            print(f"| {name} | {storage} | " + " | ".join(cells) + " |")
    return 0


def total(cfg: Qwen2VLConfig, shapes, storage: str, n: int, args: argparse.Namespace) -> str:
    """Per-device GiB, or "-" where TP n does not divide the heads."""
    try:
        shard_config(cfg, n)
    except ConfigError:
        return "-"
    llm, vit = weight_bytes(cfg, shapes, n, int8=storage == "int8")
    return f"{(llm + vit + kv_cache_bytes(cfg, n, args.context, args.batch)) / GIB:.1f}"


def row(cfg: Qwen2VLConfig, shapes, storage: str, n: int, args: argparse.Namespace) -> str:
    try:
        shard_config(cfg, n)
    except ConfigError:
        t = cfg.text
        return (
            f"{'-':>8} {'-':>6} {'-':>7} {'-':>8}  (TP {n} does not divide "
            f"{t.num_attention_heads} heads / {t.num_key_value_heads} kv heads)"
        )
    llm, vit = weight_bytes(cfg, shapes, n, int8=storage == "int8")
    kv = kv_cache_bytes(cfg, n, args.context, args.batch)
    cols = [llm / GIB, vit / GIB, kv / GIB, (llm + vit + kv) / GIB]
    return f"{cols[0]:>8.2f} {cols[1]:>6.2f} {cols[2]:>7.2f} {cols[3]:>8.2f}"


def tensor_shapes(cfg: Qwen2VLConfig) -> dict[str, torch.Size]:
    """Every tensor of the whole model (a tied lm_head listed too), built on the meta device."""
    with torch.device("meta"):
        return {k: v.shape for k, v in Qwen2VL(cfg).state_dict().items()}


def weight_bytes(
    cfg: Qwen2VLConfig, shapes: dict[str, torch.Size], n: int, *, int8: bool
) -> tuple[int, int]:
    """(LLM bytes, ViT bytes) on one device of a TP-n group."""
    llm = vit = 0
    for key, shape in shapes.items():
        local = list(shape)
        dim = split_dim(key)
        if dim is not None:
            local[dim] = -(-shape[dim] // n)
        numel = math.prod(local)
        if key.startswith("visual."):
            vit += numel * BF16
        elif int8 and _quantized(key):
            llm += numel + local[0] * 4  # int8 weights, a float32 scale per output row
        elif not (key == "lm_head.weight" and cfg.text.tie_word_embeddings):
            llm += numel * BF16  # (a tied bf16 lm_head is the embedding: counted once)
    return llm, vit


def _quantized(key: str) -> bool:
    parts = key.split(".")
    return key == "lm_head.weight" or (
        key.startswith("model.layers.") and parts[-2] in LLM_LINEARS and parts[-1] == "weight"
    )


def kv_cache_bytes(cfg: Qwen2VLConfig, n: int, context: int, batch: int) -> int:
    t = cfg.text
    return (
        2 * t.num_hidden_layers * (t.num_key_value_heads // n) * t.head_dim * context * batch * BF16
    )
