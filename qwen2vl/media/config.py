"""Media defaults of a checkpoint, read from its `preprocessor_config.json`.

Both file styles are read: transformers 4 writes top-level `min_pixels`/`max_pixels`;
transformers 5 writes `size: {shortest_edge: min_pixels, longest_edge: max_pixels}` (older
files may say `size: {min_pixels, max_pixels}`). Top-level keys win, as in transformers.
A `video_preprocessor_config.json` beside it, when present, sets the video pixel bounds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen2vl.errors import ConfigError
from qwen2vl.media.image import IMAGE_MAX_PIXELS, IMAGE_MIN_PIXELS, ImageSettings
from qwen2vl.media.patches import CLIP_MEAN, CLIP_STD
from qwen2vl.media.sampling import (
    MAX_VIDEO_TOKENS,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VideoSettings,
)


@dataclass(frozen=True)
class MediaConfig:
    """A checkpoint's media defaults; `image_settings()` / `video_settings()` turn them into the
    settings `process_image` / `process_video` take."""

    min_pixels: int = IMAGE_MIN_PIXELS
    max_pixels: int = IMAGE_MAX_PIXELS
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    video_min_pixels: int = VIDEO_MIN_PIXELS
    video_max_pixels: int = VIDEO_MAX_PIXELS
    video_max_tokens: int | None = MAX_VIDEO_TOKENS

    def __post_init__(self) -> None:
        for name in (
            "patch_size",
            "merge_size",
            "temporal_patch_size",
            "min_pixels",
            "video_min_pixels",
        ):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(
                    f"media config {name} must be a positive int, got {getattr(self, name)!r}"
                )
        if self.max_pixels < self.min_pixels or self.video_max_pixels < self.video_min_pixels:
            raise ConfigError(
                f"media config max below min: pixels {self.min_pixels}..{self.max_pixels}, "
                f"video pixels {self.video_min_pixels}..{self.video_max_pixels}"
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError(
                f"image_mean/image_std need 3 values, std > 0: {self.image_mean}, {self.image_std}"
            )

    @classmethod
    def from_hf(
        cls, preprocessor: dict[str, Any], video: dict[str, Any] | None = None
    ) -> MediaConfig:
        """From preprocessor_config.json's dict and, if any, video_preprocessor_config.json's."""
        values: dict[str, Any] = {}
        min_pixels, max_pixels = _pixel_bounds(preprocessor)
        if min_pixels is not None:
            values["min_pixels"] = min_pixels
        if max_pixels is not None:
            values["max_pixels"] = max_pixels
        for name in ("patch_size", "merge_size", "temporal_patch_size"):
            if preprocessor.get(name) is not None:
                values[name] = int(preprocessor[name])
        for name in ("image_mean", "image_std"):
            if preprocessor.get(name) is not None:
                values[name] = tuple(float(v) for v in preprocessor[name])
        if video:
            video_min, video_max = _pixel_bounds(video)
            if video_min is not None:
                values["video_min_pixels"] = video_min
            if video_max is not None:
                values["video_max_pixels"] = video_max
        return cls(**values)

    def image_settings(self) -> ImageSettings:
        """This checkpoint's image defaults; change one for a call with `dataclasses.replace`."""
        return ImageSettings(
            min_pixels=self.min_pixels, max_pixels=self.max_pixels, **self._patching()
        )

    def video_settings(self) -> VideoSettings:
        """This checkpoint's video defaults; change one for a call with `dataclasses.replace`."""
        return VideoSettings(
            min_pixels=self.video_min_pixels,
            max_pixels=self.video_max_pixels,
            max_tokens=self.video_max_tokens,
            **self._patching(),
        )

    def _patching(self) -> dict[str, Any]:
        return dict(
            patch_size=self.patch_size,
            merge_size=self.merge_size,
            temporal_patch_size=self.temporal_patch_size,
            image_mean=self.image_mean,
            image_std=self.image_std,
        )


def load_media_config(checkpoint_dir: str | os.PathLike) -> MediaConfig:
    """MediaConfig of a checkpoint directory; defaults when it has no preprocessor_config.json."""
    root = Path(checkpoint_dir)
    preprocessor = _read_json(root / "preprocessor_config.json")
    video = _read_json(root / "video_preprocessor_config.json")
    return MediaConfig.from_hf(preprocessor or {}, video)


def _pixel_bounds(cfg: dict[str, Any]) -> tuple[int | None, int | None]:
    size = cfg.get("size") or {}
    if not isinstance(size, dict):
        size = {}
    lo = cfg.get("min_pixels", size.get("shortest_edge", size.get("min_pixels")))
    hi = cfg.get("max_pixels", size.get("longest_edge", size.get("max_pixels")))
    return (None if lo is None else int(lo)), (None if hi is None else int(hi))


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data
