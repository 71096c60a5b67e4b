"""Rotary embeddings: the ViT's 2D rotary and the LLM's M-RoPE, as pure functions.

Letters: B batch, T tokens, N patches, D head dim, M spatial merge size.

M-RoPE gives every LLM token three position ids (temporal, height, width). Text tokens use the
same id on all three axes. A visual item with an LLM grid of t x h x w tokens (after the MxM merge)
gets (start + ti, start + hi, start + wi); the text after it continues at max(all ids so far) + 1.
The rotary frequencies of a head are split into sections (16/24/24 for head_dim 128): the first
section rotates by the temporal id, the second by the height id, the third by the width id.

Absolute time (Qwen2.5-VL, ``tokens_per_second`` set): a video's temporal id of grid step ti is
``floor(ti * second_per_grid * tokens_per_second)`` (plus start), second_per_grid =
temporal_patch_size / sampled fps, computed in float32 in that order as the original release
does; images are not scaled. Text after a visual item continues at max(all ids so far) + 1, as
the original releases do. transformers 5.x differs from the originals in two ways (pinned in
tests/model/test_rope.py): its text after an item continues at start + max(h, w) (ignoring the
temporal extent, so it differs when a video's last temporal id is the largest), and 5.x releases
before transformers PR #48669 truncated second_per_grid to an integer before multiplying (0.5 s
at 4 fps became 0, every frame at time 0); 5.24 multiplies as the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from qwen2vl.errors import Qwen2VLError


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] rotated by cos/sin broadcastable to it."""
    return x * cos + rotate_half(x) * sin


def inv_freq(dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


# ---- vision: 2D rotary over (row, col) of each patch -------------------------------------------


def vision_patch_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) of every patch in the processor order: each MxM merge window is contiguous.

    grid_thw [I, 3] in patches -> [N, 2] with N = sum(t*h*w).
    """
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # [h/M, M, w/M, M] -> window-major order [h/M, w/M, M, M]
        rc = torch.stack([rows.permute(0, 2, 1, 3), cols.permute(0, 2, 1, 3)], dim=-1).reshape(
            -1, 2
        )
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


def vision_rotary(
    grid_thw: torch.Tensor,
    head_dim: int,
    theta: float,
    merge: int,
    device: torch.device | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, head_dim] in float32: half the frequencies follow the row, half the column."""
    pos = vision_patch_positions(grid_thw, merge).to(device)  # [N, 2]
    freqs = pos[..., None].float() * inv_freq(head_dim // 2, theta, device)  # [N, 2, D/4]
    freqs = freqs.flatten(1)  # [N, D/2]: row freqs then column freqs
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
    return emb.cos(), emb.sin()


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """Boundaries of the attention windows: one per image and per temporal slice of a video."""
    lengths = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
    return torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))


# ---- LLM: M-RoPE ---------------------------------------------------------------------------------


def mrope_positions(
    input_ids: torch.Tensor,
    *,
    image_token_id: int,
    video_token_id: int,
    merge: int,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None = None,
    tokens_per_second: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D position ids and the per-sequence rope delta.

    input_ids [B, T]; attention_mask [B, T] (1 = real token, 0 = padding, any side).
    Images and videos are matched to grids in the order they appear, across the whole batch.
    With tokens_per_second, video temporal ids are on a time axis (module docstring):
    second_per_grid_ts [videos] gives each video's seconds per temporal grid step (None: 1.0
    each, transformers' default, right for 2 fps with temporal_patch_size 2).
    Returns positions [3, B, T] (padding gets 0) and rope_deltas [B] such that the position of the
    n-th real token of a sequence continued as text (n counted from 0) is n + rope_deltas[b].
    """
    B, T = input_ids.shape
    mask = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.bool()
    )
    video_scales = _time_scales(video_grid_thw, second_per_grid_ts, tokens_per_second)
    grids = {
        image_token_id: _grid_iter(image_grid_thw, None),
        video_token_id: _grid_iter(video_grid_thw, video_scales),
    }
    positions = torch.zeros(3, B, T, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    for b in range(B):
        ids = input_ids[b][mask[b]]
        pos = _sequence_positions(ids.tolist(), grids, merge, tokens_per_second)
        pos = pos.to(input_ids.device)
        positions[:, b, mask[b]] = pos
        deltas[b] = (pos.max() + 1 - len(ids)) if len(ids) else 0
    for token_id, it in grids.items():
        if next(it, None) is not None:
            kind = "image" if token_id == image_token_id else "video"
            raise Qwen2VLError(f"more {kind} grids were given than {kind}s appear in input_ids")
    return positions, deltas


def _grid_iter(grid_thw: torch.Tensor | None, scales: torch.Tensor | None):
    """(grid, time scale or None) of each item in order."""
    grids = [] if grid_thw is None else grid_thw.tolist()
    return iter(zip(grids, [None] * len(grids) if scales is None else scales, strict=True))


def _time_scales(
    grid_thw: torch.Tensor | None,
    second_per_grid_ts: torch.Tensor | Sequence[float] | None,
    tokens_per_second: float | None,
) -> torch.Tensor | None:
    """Per video, the float32 seconds per grid step; None without absolute time."""
    if tokens_per_second is None or grid_thw is None:
        return None
    if second_per_grid_ts is None:
        return torch.ones(len(grid_thw))
    scales = torch.as_tensor(second_per_grid_ts, dtype=torch.float32).flatten().cpu()
    if len(scales) != len(grid_thw):
        raise Qwen2VLError(
            f"{len(scales)} second_per_grid_ts were given for {len(grid_thw)} videos"
        )
    return scales


def _sequence_positions(
    ids: list[int], grids: dict, merge: int, tokens_per_second: float | None
) -> torch.Tensor:
    """Positions [3, len(ids)] for one unpadded sequence."""
    chunks, start, i, n = [], 0, 0, len(ids)
    while i < n:
        j = i
        while j < n and ids[j] not in grids:
            j += 1
        if j > i:  # a run of text
            chunks.append(torch.arange(start, start + j - i).expand(3, -1))
            start += j - i
        if j == n:
            break
        chunk, length = _visual_positions(ids, j, grids, merge, start, tokens_per_second)
        chunks.append(chunk)
        start = int(chunk.max()) + 1
        i = j + length
    if not chunks:
        return torch.zeros(3, 0, dtype=torch.long)
    return torch.cat(chunks, dim=1)


def _visual_positions(
    ids: list[int], at: int, grids: dict, merge: int, start: int, tokens_per_second: float | None
):
    token = ids[at]
    grid, scale = next(grids[token], (None, None))
    if grid is None:
        raise Qwen2VLError(
            "input_ids hold more visual items than grids were given "
            "(image features and image tokens do not match)"
        )
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    length = t * h * w
    if ids[at : at + length] != [token] * length:
        raise Qwen2VLError(
            f"a visual item with grid {grid} needs {length} consecutive placeholder "
            "tokens; input_ids have a different count (image features and image "
            "tokens do not match)"
        )
    steps = torch.arange(t)
    if scale is not None:  # floor(t * second_per_grid * tokens_per_second), float32, that order
        steps = (steps * scale * tokens_per_second).long()
    ti = steps.view(t, 1, 1).expand(t, h, w)
    hi = torch.arange(h).view(1, h, 1).expand(t, h, w)
    wi = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([ti, hi, wi]).reshape(3, -1) + start, length


def text_positions(
    attention_mask: torch.Tensor | None,
    B: int,
    T: int,
    offset: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Plain 1D positions [3, B, T] for text-only input; with left padding each row starts at 0."""
    if attention_mask is None:
        pos = torch.arange(offset, offset + T, device=device).expand(B, -1)
    else:
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + offset
    return pos.unsqueeze(0).expand(3, -1, -1)


def mrope_cos_sin(
    positions: torch.Tensor, head_dim: int, theta: float, section: list[int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [3, B, T] -> cos, sin [B, T, head_dim] with each frequency band on its own axis."""
    axis, freq = _mrope_tables(head_dim, theta, tuple(section), str(positions.device))
    pos = positions.index_select(0, axis).permute(1, 2, 0)  # [B, T, D/2]: the axis of each freq
    freqs = pos.float() * freq
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@lru_cache(maxsize=16)
def _mrope_tables(head_dim: int, theta: float, section: tuple[int, ...], device: str):
    """Which position axis each rotary frequency follows [D/2], and the frequencies [D/2]."""
    axis = torch.repeat_interleave(torch.arange(3), torch.tensor(section)).to(device)
    return axis, inv_freq(head_dim, theta, torch.device(device))
