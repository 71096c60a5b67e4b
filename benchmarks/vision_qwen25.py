"""The Qwen2.5-VL vision tower (window attention) against transformers', on the 7B release's
vision config with random weights shared by both, in one process. Prints numbers; asserts
nothing. Needs transformers (pip install -e '.[test]').

    .venv/bin/python benchmarks/vision_qwen25.py [--sizes 448x448,812x588] [--rounds 2]
        [--depth 8] [--dtype float32|bfloat16] [--device cpu|cuda]

--depth 8 (the default) keeps the first 8 blocks, block 7 with full attention: the release's
mix (4 of 32 blocks full) at a quarter of the time, which a 2-core machine needs (about 6 min
there); --depth 32 runs the whole tower.

Per image size: both run once to warm up, then --rounds rounds in which each runs once in turn
(interleaved, so a shared machine's drift falls on both alike); the figure is the median. The
outputs are compared first (max |diff|). The second default size is no multiple of the 112 px
window, so its frames have partial windows (unequal cu_seqlens segments).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch
import transformers
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)

from qwen2vl.bench import timed
from qwen2vl.media import smart_resize
from qwen2vl.model.vision import VisionTransformer
from qwen2vl.presets import preset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="448x448,812x588", help="comma list of WIDTHxHEIGHT")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--depth", type=int, default=8, help="ViT blocks (the release has 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    cfg = preset("2.5-7B")
    if args.depth != cfg.vision.depth:
        full = [i for i in cfg.vision.fullatt_block_indexes if i < args.depth]
        vision = dataclasses.replace(cfg.vision, depth=args.depth, fullatt_block_indexes=full)
        cfg = dataclasses.replace(cfg, vision=vision)
    ours, theirs = build(cfg, getattr(torch, args.dtype), torch.device(args.device))
    print(f"threads {torch.get_num_threads()}, {args.dtype}, depth {cfg.vision.depth}")
    print(f"{'image':>10} {'patches':>8} {'windows':>8} {'qwen2vl s':>10} {'transformers s':>15}")
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
    windows = -(-h // 112) * -(-w // 112)
    print(f"{width}x{height:<5} {int(grid.prod()):>8} {windows:>8} {a:>10.3f} {b:>15.3f}", end="")
    print(f"   ratio {b / a:.2f}x (transformers / qwen2vl), max |diff| {diff:.1e}")


def build(cfg, dtype: torch.dtype, device: torch.device):
    """Our ViT with random weights, and transformers' holding the very same tensors."""
    torch.manual_seed(0)
    ours = VisionTransformer(cfg.vision).to(device=device, dtype=dtype).eval()
    hf_cfg = transformers.Qwen2_5_VLConfig(**cfg.to_hf()).vision_config
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        theirs = Qwen2_5_VisionTransformerPretrainedModel(hf_cfg)
    theirs.load_state_dict(ours.state_dict(), strict=True, assign=True)
    theirs.rotary_pos_emb.inv_freq = theirs.rotary_pos_emb.compute_axial_rope_parameters(hf_cfg)[
        0
    ].to(device)
    return ours, theirs.eval()


if __name__ == "__main__":
    raise SystemExit(main())
