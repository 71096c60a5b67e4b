"""Weight-only quantisation of the LLM's linears as a module swap after construction: int8 per
output channel, int4 in groups along the input dimension.

int8: each output channel of a Linear weight [N, K] gets one scale = max|w| / 127; weights are
stored as int8 and multiplied on the fly. Decode rows on CPU read the int8 weights directly (half
the bytes of bf16: decode speed is bound by those bytes): the GEMV kernel (gemv.py) where the load
chose it, which multiplies them by the activations quantised to int8 in groups of 32 (integer
products, as llama.cpp's q8_0 does: 1.25x the widened-float kernel here, measured), else
PyTorch's fused ``_weight_int8pack_mm``.

int4: asymmetric, in groups of ``GROUP`` = 64 weights along K: w ~= u * scale + min with u in
0..15, scale and min float16 per group (4.5 bits a weight; a layer's K is padded with zero
weights to a multiple of the group). Measured on 2B-shaped layers (gaussian weights, 8 input
columns x10), the relative output error is 0.11 / 0.10 (8960x1536 / 1536x8960) against
0.16 / 0.13 symmetric; symmetric groups of 32, the same 4.5 bits, give 0.13 / 0.11 and take
1.3-1.5x as long to decode; asymmetric groups of 128 (4.25 bits) give 0.20 / 0.12. The min
costs the kernel nothing (folded into one sum per group, see gemv.cpp); symmetric would save
0.25 bits a weight.
Packed two per byte in chunks of 64 along K: byte j of a chunk holds weight j (low nibble) and
weight 32 + j (high nibble), so gemv.cpp unpacks 64 weights with one load, a mask and a shift.
lm_head stays int8: the logits are where 4-bit error shows first.

On CPU, fewer than compute.MIN_ROWS activation rows go through gemv.py's int4 kernel (decode,
and short prefills: faster than dequantising, measured); more rows dequantise into a float32
workspace and multiply in float32 (in x's dtype where this CPU's half-precision matmuls are
fast); elsewhere the weight is dequantised per call.
``dequantize_int4`` below is the reference the kernel's unpacking is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.generation import gemv
from qwen2vl.generation.compute import PYTORCH_ONLY, Kernels, many_rows, widened, workspace

LLM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUP = 64  # int4 weights per scale and min
CHUNK = 64  # int4 weights per packed run of 32 bytes (see the module docstring)


def quantize_per_channel(
    w: torch.Tensor, amax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> int8 weights [N, K], float32 scales [N] with w ~= q * scale[:, None].
    ``amax`` [N]: each row's max |w| when the row is wider than ``w`` (split across ranks)."""
    w = w.float()
    if amax is None:
        amax = w.abs().amax(dim=1)
    scale = (amax / 127).clamp(min=1e-12)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_groups(
    w: torch.Tensor, group: int = GROUP
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] -> packed uint8 [N, Kp / 2], float16 scales and mins [N, Kp / group], Kp = K
    padded with zero weights to a multiple of ``group``; w ~= u * scale + min per group."""
    if group % CHUNK:
        raise ValueError(f"group={group}: int4 groups are multiples of {CHUNK} weights")
    n, k = w.shape
    kp = -(-k // group) * group
    g = F.pad(w.float(), (0, kp - k)).view(n, kp // group, group)
    lo = g.amin(-1).half()
    scale = ((g.amax(-1) - lo.float()) / 15).clamp(min=2**-14).half()  # float16's least normal
    u = ((g - lo.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
    return pack_int4(u.to(torch.uint8).view(n, kp)), scale, lo


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """u [N, K] in 0..15, K a multiple of CHUNK -> [N, K / 2]; chunk byte j: u[j], u[32 + j]."""
    n, k = u.shape
    u = u.view(n, k // CHUNK, 2, CHUNK // 2)  # [N, chunks, low/high half, 32]
    return (u[:, :, 0] | (u[:, :, 1] << 4)).view(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``pack_int4``: [N, K / 2] -> u [N, K]."""
    n, half = packed.shape
    p = packed.view(n, half // (CHUNK // 2), 1, CHUNK // 2)
    return torch.cat([p & 15, p >> 4], dim=2).view(n, half * 2)


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int = GROUP
) -> torch.Tensor:
    """The stored int4 weights as float32 [N, Kp] (PyTorch reference of gemv.dequantize_int4)."""
    u = unpack_int4(packed).float().view(*scales.shape, group)
    return (u * scales.float()[..., None] + mins.float()[..., None]).flatten(1)


class Int8Linear(nn.Module):
    def __init__(
        self,
        linear: nn.Linear,
        kernels: Kernels = PYTORCH_ONLY,
        *,
        amax: torch.Tensor | None = None,  # see quantize_per_channel
    ):
        super().__init__()
        if linear.weight.is_meta:  # a stored checkpoint's module (quantized_checkpoint.py): shapes
            q = torch.empty(linear.weight.shape, dtype=torch.int8, device="meta")
            scale = torch.empty(linear.out_features, device="meta")
        else:
            q, scale = quantize_per_channel(linear.weight.detach(), amax)
        self.register_buffer("weight", q)
        self.register_buffer("scales", scale)  # float32: exact max|w| / 127
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernels = kernels

    def gemv_operands(self, x: torch.Tensor) -> gemv.Operands | None:
        """The decode kernel's operands for x's rows, where the kernel takes them."""
        if self.kernels.gemv and gemv.fits(x, self.weight):
            return self.weight, self.scales, None, self.bias, 0
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv_operands(x) is not None:
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


class Int4Linear(nn.Module):
    """A Linear with int4 weights in groups (see the module docstring); ``weight`` holds the
    packed bytes [N, Kp / 2], ``scales`` and ``mins`` float16 [N, Kp / group]."""

    def __init__(self, linear: nn.Linear, kernels: Kernels = PYTORCH_ONLY, group: int = GROUP):
        super().__init__()
        if linear.weight.is_meta:  # a stored checkpoint's module (quantized_checkpoint.py): shapes
            n, groups = linear.out_features, -(-linear.in_features // group)
            packed = torch.empty(n, groups * group // 2, dtype=torch.uint8, device="meta")
            scales = mins = torch.empty(n, groups, dtype=torch.float16, device="meta")
        else:
            packed, scales, mins = quantize_groups(linear.weight.detach(), group)
        self.register_buffer("weight", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), False)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group, self.kernels = group, kernels

    def gemv_operands(self, x: torch.Tensor) -> gemv.Operands | None:
        """The int4 kernel's operands for x's rows, where the kernel takes them (any rows below
        compute.MIN_ROWS: see gemv.linear_int4)."""
        on_cpu, dtype_ok = x.device.type == "cpu", x.dtype in gemv.ACTIVATION_DTYPES
        if self.kernels.gemv and on_cpu and dtype_ok and not many_rows(x):
            return self.weight, self.scales, self.mins, self.bias, self.group
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        on_cpu = x.device.type == "cpu"
        if self.gemv_operands(x) is not None:
            return gemv.linear_int4(x, self.weight, self.scales, self.mins, self.bias, self.group)
        if self.kernels.gemv and on_cpu:  # the kernel's one-pass unpacking, into the workspace
            w = workspace(self.weight.shape[0], self.weight.shape[1] * 2)
            gemv.dequantize_int4(self.weight, self.scales, self.mins, self.group, w)
        else:
            w = dequantize_int4(self.weight, self.scales, self.mins, self.group)
        w = w[:, : self.in_features]  # float32 [N, K]: the padding dropped
        # float32 on CPU (w is float32 already) unless a fast half-precision matmul pays for the
        # cast: many rows on a CPU that has one
        if not on_cpu or (many_rows(x) and not self.kernels.widen):
            w = w.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(w.dtype)
        return F.linear(x.to(w.dtype), w, bias).to(x.dtype)


def quantize_int8(
    model: nn.Module, *, vision: bool = False, lm_head: bool = True, kernels: Kernels = PYTORCH_ONLY
) -> nn.Module:
    """Swap the LLM's linears (and optionally the ViT's and lm_head) for Int8Linear, in place;
    ``kernels`` (see compute.py) says which CPU paths they take.

    Layer by layer, so peak memory holds one layer's float weight beside the int8 model.
    """
    for parent, child_name, child in _targets(model, vision=vision, lm_head=lm_head):
        setattr(parent, child_name, Int8Linear(child, kernels))
    return model


def quantize_int4(
    model: nn.Module, *, group: int = GROUP, kernels: Kernels = PYTORCH_ONLY
) -> nn.Module:
    """Swap the LLM's linears for Int4Linear and lm_head for Int8Linear, in place (one layer's
    float weight at a time beside the quantised model)."""
    for parent, child_name, child in _targets(model, vision=False, lm_head=True):
        quantized = Int8Linear(child, kernels) if child_name == "lm_head" else None
        setattr(parent, child_name, quantized or Int4Linear(child, kernels, group))
    return model


def quantized_modules(model: nn.Module) -> dict[str, Int8Linear | Int4Linear]:
    """The quantised linears of ``model`` by their module names."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


def use_kernels(model: nn.Module, kernels: Kernels) -> None:
    """Point every quantised linear of ``model`` at ``kernels`` (after loading stored ones)."""
    for module in quantized_modules(model).values():
        module.kernels = kernels


def _targets(model: nn.Module, *, vision: bool, lm_head: bool) -> list[tuple]:
    """(parent, name, Linear) of each linear the quantisers swap."""
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
    return targets
