"""The vision tower (Qwen2-VL, or Qwen2.5-VL with window attention) against transformers', on a
release's vision config with random weights shared by both, in one process. Prints numbers;
asserts nothing. Needs transformers (pip install -e '.[test]').

    .venv/bin/python benchmarks/vision_tower.py [--preset 2B | 2.5-7B ...] [--depth 8]
        [--sizes 448x448,812x588] [--rounds 2] [--dtype bfloat16|float32] [--device cpu|cuda]

--depth 8 (the default) keeps the first 8 blocks (for Qwen2.5-VL block 7 with full attention:
the release's mix, 4 of 32 blocks full) at a quarter of the time, which a 2-core machine needs;
--depth 32 runs the whole tower. On CPU ours takes the matmul paths the loader chooses
(``choose_kernels``, logged), as in ``load_for_inference``.

Per image size: both run once to warm up, then --rounds rounds in which each runs once in turn
(interleaved, so a shared machine's drift falls on both alike); the figure is the median. The
outputs are compared first (max |diff|). The second default size is no multiple of the 112 px
window, so Qwen2.5-VL's frames have partial windows (unequal cu_seqlens segments).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics

import torch
import transformers
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from qwen2vl.bench import timed
from qwen2vl.generation.compute import choose_kernels, cpu_matmuls
from qwen2vl.media import smart_resize
from qwen2vl.model.vision import VisionTransformer
from qwen2vl.presets import PRESETS, preset

REFERENCE = {  # model_type -> (transformers config class, vision tower class)
    "qwen2_vl": (transformers.Qwen2VLConfig, Qwen2VisionTransformerPretrainedModel),
    "qwen2_5_vl": (transformers.Qwen2_5_VLConfig, Qwen2_5_VisionTransformerPretrainedModel),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="2.5-7B", choices=sorted(PRESETS))
    p.add_argument("--sizes", default="448x448,812x588", help="comma list of WIDTHxHEIGHT")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depth", type=int, default=8, help="ViT blocks (the releases have 32)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # qwen2vl's kernel choice
    cfg = preset(args.preset)
    if args.depth != cfg.vision.depth:
        full = [i for i in cfg.vision.fullatt_block_indexes if i < args.depth]
        vision = dataclasses.replace(cfg.vision, depth=args.depth, fullatt_block_indexes=full)
        cfg = dataclasses.replace(cfg, vision=vision)
    ours, theirs = build(cfg, getattr(torch, args.dtype), torch.device(args.device))
    print(f"{args.preset}, threads {torch.get_num_threads()}, {args.dtype}, depth {args.depth}")
    print(f"{'image':>10} {'patches':>8} {'qwen2vl s':>10} {'transformers s':>15}")
    for size in args.sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        compare(ours, theirs, width, height, rounds=args.rounds, device=args.device)
    return 0


def compare(ours, theirs, width: int, height: int, *, rounds: int, device: str) -> None:
    h, w = smart_resize(height, width, factor=28, min_pixels=56 * 56, max_pixels=2**40)
    grid = torch.tensor([[1, h // 14, w // 14]], device=device)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grid.prod()), 3 * 2 * 14 * 14, generator=g).to(device)
    runs = {
        "ours": lambda: ours(pixels, grid),
        "theirs": lambda: theirs(pixels, grid_thw=grid).pooler_output,
    }
    with torch.inference_mode():  # the first calls compare, and warm both up
        diff = (runs["ours"]().float() - runs["theirs"]().float()).abs().max().item()
        times = {name: [] for name in runs}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(timed(run)[0])
    a, b = (statistics.median(times[n]) for n in ("ours", "theirs"))
    print(f"{width}x{height:<5} {int(grid.prod()):>8} {a:>10.3f} {b:>15.3f}", end="")
    print(f"   ratio {b / a:.2f}x (transformers / qwen2vl), max |diff| {diff:.1e}")


def build(cfg, dtype: torch.dtype, device: torch.device):
    """Our ViT with random weights (on CPU with the loader's matmul paths), and transformers'
    holding the very same tensors."""
    torch.manual_seed(0)
    ours = VisionTransformer(cfg.vision).to(device=device, dtype=dtype).eval()
    config_cls, tower_cls = REFERENCE[cfg.model_type]
    hf_cfg = config_cls(**cfg.to_hf()).vision_config
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        theirs = tower_cls(hf_cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    theirs.rotary_pos_emb.inv_freq = theirs.rotary_pos_emb.compute_axial_rope_parameters(hf_cfg)[
        0
    ].to(device)
    if device.type == "cpu":
        ours = cpu_matmuls(ours, choose_kernels(dtype))
    return ours, theirs.eval()


if __name__ == "__main__":
    raise SystemExit(main())
