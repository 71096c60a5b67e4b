"""Activations as the decode kernel multiplies them against integer weights (gemv.cpp)."""

import torch


def int8_activations(x: torch.Tensor, kp: int, group: int) -> torch.Tensor:
    """x [M, K] zero-padded to kp, int8 per group with the kernel's float32 arithmetic (so the
    same roundings), as float64 [M, K]."""
    m, k = x.shape
    g = torch.nn.functional.pad(x.float(), (0, kp - k)).view(m, kp // group, group)
    amax = g.abs().amax(-1, keepdim=True)
    # 127 / amax as one float32 division (a Python number over a tensor is not one)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0)
    q = (g * inv).round()  # |q| <= 127
    return (q.double() * (amax / 127).double()).view(m, kp)[:, :k]


def half_steps(x: torch.Tensor, kp: int, group: int) -> torch.Tensor:
    """[M, kp / group]: the most any x of each group moves when rounded to int8 (half a step)."""
    m, k = x.shape
    padded = torch.nn.functional.pad(x.double(), (0, kp - k)).view(m, -1, group)
    return padded.abs().amax(-1) / 254
