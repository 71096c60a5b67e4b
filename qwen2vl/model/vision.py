"""The Qwen2-VL vision tower: a 675M-parameter ViT (for the released sizes) with 2D rotary.

Letters: N patches (all images / frames of a call, concatenated), C embed_dim, H heads, D head dim,
M spatial merge size.

pixel_values [N, 3*2*14*14] (the processor's flattened 2-frame 14x14 patches, each MxM merge window
contiguous) -> patch embed -> blocks (attention only inside each image / video frame) -> merger
(LayerNorm, then each MxM window of C-vectors concatenated and projected by an MLP to the LLM width)
-> [N / M^2, LLM hidden].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import VisionConfig
from qwen2vl.model.attention import attention
from qwen2vl.model.rope import apply_rotary, vision_cu_seqlens, vision_rotary


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


class VisionMlp(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMlp(cfg)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.window = cfg.embed_dim * cfg.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.window, self.window), nn.GELU(), nn.Linear(self.window, cfg.hidden_size)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.window))  # [N/M^2, LLM hidden]


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)
        self.gradient_checkpointing = False

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3*2*14*14], grid_thw [I, 3] -> merged features [N/M^2, LLM hidden]."""
        x = self.patch_embed(pixel_values)
        cos, sin = vision_rotary(
            grid_thw,
            self.cfg.head_dim,
            self.cfg.rope_theta,
            self.cfg.spatial_merge_size,
            device=x.device,
        )
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, D]: broadcast over heads
        cu_seqlens = vision_cu_seqlens(grid_thw).to(x.device)
        for blk in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(
                    blk, x, cos, sin, cu_seqlens, use_reentrant=False
                )
            else:
                x = blk(x, cos, sin, cu_seqlens)
        return self.merger(x)
