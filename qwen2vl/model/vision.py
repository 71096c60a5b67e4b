"""The vision tower of Qwen2-VL and Qwen2.5-VL: a ViT (675M parameters released) with 2D rotary.

Letters: N patches (all images / frames of a call, concatenated), C embed_dim, H heads, D head dim,
M spatial merge size, U = N / M^2 merged units.

pixel_values [N, 3*2*14*14] (the processor's flattened 2-frame 14x14 patches, each MxM merge window
contiguous) -> patch embed -> blocks (attention only inside each image / video frame) -> merger
(norm, then each MxM window of C-vectors concatenated and projected by an MLP to the LLM width)
-> [U, LLM hidden].

The families differ by config fields only: the norm (LayerNorm / RMSNorm), the MLP (fc1-fc2 /
gated) and, with ``window_size``, window attention (Qwen2.5-VL): the merged units are reordered
window by window before the blocks, so each window is one contiguous cu_seqlens segment; blocks in
``fullatt_block_indexes`` attend across the whole image or frame (still one segment each, since
the reorder stays inside a frame); the merger's output is put back into the processor's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import VisionConfig
from qwen2vl.model.attention import attention
from qwen2vl.model.rope import apply_rotary, vision_cu_seqlens, vision_rotary
from qwen2vl.model.text import RMSNorm


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.shape = (cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(
            cfg.in_channels,
            cfg.embed_dim,
            kernel_size=self.shape[1:],
            stride=self.shape[1:],
            bias=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A Conv3d whose kernel equals its input is a matmul; linear() avoids conv overhead.
        w = self.proj.weight.flatten(1)  # [C, 3*2*14*14]
        return F.linear(x.to(w.dtype), w)  # [N, C]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=True)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.num_heads, -1).unbind(1)  # each [N, H, D]
        # The reference rotates in float32 whatever the weights' dtype.
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, N, D]
        out = attention(q, k, v, cu_seqlens=cu_seqlens)
        return self.proj(out[0].transpose(0, 1).reshape(N, -1))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTS = {"quick_gelu": quick_gelu, "silu": F.silu}


class VisionMlp(nn.Module):
    """fc2(act(fc1(x))): Qwen2-VL."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)
        self.act = ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionGatedMlp(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)), all with bias: Qwen2.5-VL."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.up_proj = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.down_proj = nn.Linear(cfg.mlp_dim, cfg.embed_dim)
        self.act = ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


MLPS = {"fc": VisionMlp, "gated": VisionGatedMlp}


def make_norm(cfg: VisionConfig) -> nn.Module:
    """The norm of cfg.norm over C: LayerNorm (weight and bias) or RMSNorm (weight only)."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.embed_dim, eps=1e-6)
    return nn.LayerNorm(cfg.embed_dim, eps=1e-6)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.norm2 = make_norm(cfg)
        self.attn = VisionAttention(cfg)
        self.mlp = MLPS[cfg.mlp](cfg)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = make_norm(cfg)
        self.mlp = nn.Sequential(
            nn.Linear(self.window, self.window), nn.GELU(), nn.Linear(self.window, cfg.hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.window))  # [N/M^2, LLM hidden]


def window_order(grid_thw: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged units in window order, and the length of every window in units.

    grid_thw [I, 3] in merged units (t, h/M, w/M); window: side of a window in units. Each frame
    is cut into window x window squares from its top-left corner (the last row / column of
    windows is partial when a side is not a multiple); windows are taken row by row, units
    inside a window row by row (transformers' get_window_index).
    Returns order [U] (order[j] = processor-order index of the j-th unit) and lengths [W].
    """
    orders, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        nh, nw = -(-h // window), -(-w // window)
        idx = torch.arange(t * h * w).view(t, h, w)
        padded = F.pad(idx, (0, nw * window - w, 0, nh * window - h), value=-1)
        wins = padded.view(t, nh, window, nw, window).permute(0, 1, 3, 2, 4)
        wins = wins.reshape(t * nh * nw, window * window)  # [windows, units]
        orders.append(wins[wins >= 0] + offset)
        lengths.append((wins >= 0).sum(-1))
        offset += t * h * w
    return torch.cat(orders), torch.cat(lengths)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        # Which blocks attend within windows (none without window_size).
        self.windowed = [
            cfg.window_size is not None and i not in cfg.fullatt_block_indexes
            for i in range(cfg.depth)
        ]
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3*2*14*14], grid_thw [I, 3] -> merged features [N/M^2, LLM hidden]."""
        cfg, M2 = self.cfg, self.cfg.spatial_merge_size**2
        x = self.patch_embed(pixel_values)
        cos, sin = vision_rotary(
            grid_thw, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size, device=x.device
        )
        cu_full = vision_cu_seqlens(grid_thw).to(x.device)
        cu_window, order = cu_full, None
        if cfg.window_units is not None:
            units = grid_thw.clone()
            units[:, 1:] //= cfg.spatial_merge_size  # [I, 3] grid in merged units
            order, lengths = window_order(units.cpu(), cfg.window_units)
            order = order.to(x.device)
            cu_window = F.pad((lengths * M2).cumsum(0, dtype=torch.int32), (1, 0)).to(x.device)
            # [N, C] -> [U, M^2, C] -> units in window order -> [N, C]; cos/sin alike
            x, cos, sin = (t.unflatten(0, (-1, M2))[order].flatten(0, 1) for t in (x, cos, sin))
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, D]: broadcast over heads
        for blk, windowed in zip(self.blocks, self.windowed, strict=True):
            cu = cu_window if windowed else cu_full
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(blk, x, cos, sin, cu, use_reentrant=False)
            else:
                x = blk(x, cos, sin, cu)
        out = self.merger(x)  # [U, LLM hidden] in window order
        if order is not None:
            out = out[order.argsort()]  # back to the processor's order
        return out
