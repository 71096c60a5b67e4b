"""Weight-only int8 quantisation as a module swap after construction.

Each output channel of a Linear weight [N, K] gets one scale = max|w| / 127; weights are stored as
int8 and multiplied on the fly. Decode rows on CPU read the int8 weights directly (half the bytes
of bf16: decode speed is bound by those bytes): the GEMV kernel (gemv.py) where the load chose
it, else PyTorch's fused ``_weight_int8pack_mm``. Prefill-sized inputs dequantise into a
workspace (float32 where this CPU's half-precision matmuls are slow, see compute.py); elsewhere
the weight is dequantised per call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.generation import gemv
from qwen2vl.generation.compute import PYTORCH_ONLY, Kernels, many_rows, widened

LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> int8 weights [N, K], float32 scales [N] with w ~= q * scale[:, None]."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, kernels: Kernels = PYTORCH_ONLY):
        super().__init__()
        q, scale = quantize_per_channel(linear.weight.detach())
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale)  # float32: exact max|w| / 127
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels.gemv and gemv.fits(x, self.weight):
            return gemv.linear(x, self.weight, self.scales, self.bias)
        if many_rows(x) and x.device.type == "cpu":  # prefill: compute-bound, see compute.py
            w = widened(self.weight).mul_(self.scales[:, None])
            if self.kernels.widen:
                out = F.linear(x.float(), w).to(x.dtype)
            else:  # float32 x, or a CPU with fast half-precision matmuls
                out = F.linear(x, w.to(x.dtype))
        elif x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
            out = torch._weight_int8pack_mm(
                x.reshape(-1, self.in_features), self.weight, self.scales.to(x.dtype)
            ).view(*x.shape[:-1], self.out_features)
        else:
            out = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def quantize_int8(
    model: nn.Module, *, vision: bool = False, lm_head: bool = True, kernels: Kernels = PYTORCH_ONLY
) -> nn.Module:
    """Swap the LLM's linears (and optionally the ViT's and lm_head) for Int8Linear, in place;
    ``kernels`` (see compute.py) says which CPU paths they take.

    Layer by layer, so peak memory holds one layer's float weight beside the int8 model.
    """
    targets = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            in_llm = full.startswith("model.layers.") and child_name in LLM_LINEARS
            in_vit = vision and full.startswith("visual.blocks.")
            if in_llm or in_vit or (lm_head and full == "lm_head"):
                targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, Int8Linear(child, kernels))
    return model
