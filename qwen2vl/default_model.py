"""The embedded default model: a tiny Qwen2-VL trained by this project on its synthetic world.

It ships inside the package (`qwen2vl/assets/Qwen2-VL-Tiny-Synth/`, ~23 MB, bfloat16) in the
official Hugging Face layout, so `qwen2vl demo`, `chat`, `serve` and `eval` run without downloading
anything, and transformers loads it as it loads a released checkpoint. It knows only the
synthetic world (shapes, colours, counts, digits and short words, boxes, moving objects); how it
was made is `qwen2vl/synth/` (`qwen2vl build-default-model` rebuilds it).
"""

from __future__ import annotations

from pathlib import Path

from qwen2vl.errors import CheckpointError

DEFAULT_MODEL_NAME = "Qwen2-VL-Tiny-Synth"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / DEFAULT_MODEL_NAME


def default_model_dir() -> Path:
    """Where the default model lies; CheckpointError when this install lacks it."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the default model is missing from this install ({DEFAULT_MODEL_DIR}); pass "
            "--model DIR, or rebuild it with `qwen2vl build-default-model`"
        )
    return DEFAULT_MODEL_DIR


def model_or_default(path: str | Path | None) -> Path:
    """`path`, or the default model's directory when it is None."""
    return Path(path) if path is not None else default_model_dir()
