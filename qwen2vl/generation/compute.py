"""How the model's matmuls run on CPU: decode rows in the GEMV kernel, big matmuls in the fastest
dtype this CPU has.

Two regimes, chosen per call by the number of activation rows:
- Few rows (decode, up to ``gemv.MAX_ROWS``): memory-bound; ``gemv.py``'s kernel streams the bf16
  (or int8) weights near the memory bandwidth. PyTorch's kernel where it is unavailable.
- Many rows (prefill, the vision tower, from ``MIN_ROWS``): compute-bound. CPUs with bf16 matrix
  instructions (AVX512-BF16, AMX) run bf16 matmuls several times faster than float32; CPUs
  without them (AVX2, older AVX-512) several times slower (measured: 1 vs 166 GFLOP/s on an AVX2
  machine, 915 vs 209 on an AVX512-BF16 one). Which one this CPU is gets measured once; on the
  slow kind the weight is widened into a reused float32 workspace (a fresh buffer per call would
  page-fault on every use), multiplied, and the result cast back.
The weights stay in their storage dtype either way (memory and decode bandwidth unchanged).
"""

from __future__ import annotations

import functools
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.generation import gemv
from qwen2vl.model.vision import PatchEmbed

MIN_ROWS = 64  # below this a half-precision matmul is memory-bound: never widened
_local = threading.local()


def widened(w: torch.Tensor) -> torch.Tensor:
    """w as float32, in this thread's reused workspace (valid until the next call)."""
    ws = getattr(_local, "workspace", None)
    if ws is None or ws.numel() < w.numel() or ws.device != w.device:
        ws = _local.workspace = torch.empty(w.numel(), dtype=torch.float32, device=w.device)
    return ws[: w.numel()].view(w.shape).copy_(w)


@functools.cache
def half_matmul_is_slow(dtype: torch.dtype) -> bool:
    """Whether a (MIN_ROWS*2)-row matmul in ``dtype`` is slower here than widening to float32.

    Measured once per process on a 128 x 512 x 512 product (under 0.1 s on the slow kind)."""
    x = torch.randn(2 * MIN_ROWS, 512).to(dtype)
    w = torch.randn(512, 512).to(dtype)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    native = best(lambda: F.linear(x, w))
    wide = best(lambda: F.linear(x.float(), widened(w)).to(dtype))
    return native > wide


def runs_widened(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a matmul of x's rows computed in ``dtype`` runs widened to float32 here: enough
    rows to be compute-bound, a half-precision dtype, and a CPU where that dtype is slow."""
    rows = x.numel() // x.shape[-1]
    return rows >= MIN_ROWS and dtype != torch.float32 and half_matmul_is_slow(dtype)


class CPULinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if gemv.usable(x, self.weight):
            return gemv.linear(x, self.weight, bias=self.bias)
        if not runs_widened(x, self.weight.dtype):
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), widened(self.weight), bias).to(x.dtype)


class CPUPatchEmbed(PatchEmbed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        if not runs_widened(x, w.dtype):
            return super().forward(x)
        return F.linear(x.float(), widened(w.flatten(1))).to(w.dtype)


def cpu_matmuls(model: nn.Module) -> nn.Module:
    """In place: every plain nn.Linear and the patch embedding take the CPU paths above.

    Parameters and their names are untouched (the swap changes classes only), so state dicts,
    int8 quantisation and saving work as before. Float32 models keep PyTorch's kernels.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CPULinear
        elif type(module) is PatchEmbed:
            module.__class__ = CPUPatchEmbed
    return model
