"""Float32 compute for bf16/fp16 weights on CPUs without bf16 matrix units.

On such CPUs (AVX2, most AVX-512 parts) a bf16 matmul runs several times slower than a float32 one,
so a prefill or a vision encoder in bf16 is compute-bound far below what the machine can do. The
swap below keeps the weights in their storage dtype (memory and decode bandwidth unchanged) and
runs every matmul with many rows in float32: the weight is widened into a reused workspace (a
fresh buffer per call would page-fault on every use), multiplied, and the result cast back.
Matmuls with few rows (decode) stay in the storage dtype: they are memory-bound, PyTorch's bf16
GEMV already streams near the memory bandwidth, and widening would triple the bytes moved.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.model.vision import PatchEmbed

MIN_ROWS = 64  # below this the bf16 kernel wins (measured on a 2-core AVX2 machine)
_local = threading.local()


def widened(w: torch.Tensor) -> torch.Tensor:
    """w as float32, in this thread's reused workspace (valid until the next call)."""
    ws = getattr(_local, "workspace", None)
    if ws is None or ws.numel() < w.numel() or ws.device != w.device:
        ws = _local.workspace = torch.empty(w.numel(), dtype=torch.float32, device=w.device)
    return ws[: w.numel()].view(w.shape).copy_(w)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


class UpcastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = _rows(x)
        if rows < MIN_ROWS or x.dtype == torch.float32:
            return super().forward(x)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), widened(self.weight), bias).to(x.dtype)


class UpcastPatchEmbed(PatchEmbed):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        if _rows(x) < MIN_ROWS or w.dtype == torch.float32:
            return super().forward(x)
        return F.linear(x.float(), widened(w.flatten(1))).to(w.dtype)


def upcast_matmuls(model: nn.Module) -> nn.Module:
    """In place: every plain nn.Linear and the patch embedding compute large matmuls in float32.

    Parameters and their names are untouched (the swap changes classes only), so state dicts,
    int8 quantisation and saving work as before. A no-op for float32 models.
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = UpcastLinear
        elif type(module) is PatchEmbed:
            module.__class__ = UpcastPatchEmbed
    return model
