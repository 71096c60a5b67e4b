"""Resized uint8 frames to normalised, flattened vision patches, as pure functions.

Letters: F frames, H/W resized height/width in pixels, C channels (3), P patch size (14),
M merge size (2), Tp temporal patch size (2), N patches = (F/Tp) * (H/P) * (W/P).

Patch order is the official one: time, then merge windows row-major, then the MxM patches inside
a window, so every window the vision merger folds into one LLM token is contiguous. Each patch
row is laid out (C, Tp, P, P).
"""

from __future__ import annotations

import numpy as np
import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE_FACTOR = 1 / 255


def normalize_table(
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
    rescale_factor: float = RESCALE_FACTOR,
) -> np.ndarray:
    """[C, 256] float32: the normalised value of every uint8 level, per channel.

    Computed with the reference's exact arithmetic (rescale in float64, cast to float32, then
    (x - mean) / std in float32), so looking values up gives bit-identical pixels while costing a
    gather instead of three float passes over the image.
    """
    levels = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return (levels[None, :] - mean32) / std32


def patchify(
    frames: np.ndarray,
    table: np.ndarray,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> torch.Tensor:
    """frames [F, H, W, C] uint8 -> pixel_values [N, C*Tp*P*P] float32, normalised by `table`.

    F must be a multiple of Tp (pad first with `pad_frames`). H and W must be multiples of P*M.
    """
    windows = _window_major(frames, patch_size, merge_size, temporal_patch_size)
    return _lookup(windows, table, repeat=1)


def patchify_image(
    image: np.ndarray,
    table: np.ndarray,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> torch.Tensor:
    """image [H, W, C] uint8 -> [N, C*Tp*P*P]: the image as Tp identical frames (grid_t = 1)."""
    windows = _window_major(image[None], patch_size, merge_size, 1)
    return _lookup(windows, table, repeat=temporal_patch_size)


def pad_frames(frames: list[np.ndarray], multiple: int) -> list[np.ndarray]:
    """Repeat the last frame until the count is a multiple (qwen-vl-utils pads odd counts so)."""
    pad = -len(frames) % multiple
    return frames + [frames[-1]] * pad


def _window_major(frames: np.ndarray, p: int, m: int, tp: int) -> np.ndarray:
    """[F, H, W, C] uint8 -> contiguous [F/Tp, H/P/M, W/P/M, M, M, C, Tp, P, P] uint8.

    Reordering the uint8 frames before the float lookup moves a quarter of the bytes.
    """
    f, h, w, c = frames.shape
    x = frames.reshape(f // tp, tp, h // p // m, m, p, w // p // m, m, p, c)
    return np.ascontiguousarray(x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7))


def _lookup(windows: np.ndarray, table: np.ndarray, repeat: int) -> torch.Tensor:
    """windows [..., C, T, P, P] uint8 -> [rows, C*T*repeat*P*P] float32 with v -> table[c, v].

    repeat > 1 (only with T == 1) writes each looked-up patch into every temporal slot.
    """
    *lead, c, t, p, _ = windows.shape
    out = np.empty((*lead, c, t * repeat, p, p), dtype=np.float32)
    for ch in range(c):
        out[..., ch, :, :, :] = table[ch][windows[..., ch, :, :, :]]
    rows = int(np.prod(lead))
    return torch.from_numpy(out.reshape(rows, -1))
