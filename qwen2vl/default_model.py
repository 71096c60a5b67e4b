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
from qwen2vl.hub import resolve_model

DEFAULT_MODEL_NAME = "Qwen2-VL-Tiny-Synth"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / DEFAULT_MODEL_NAME
# What chat, serve and the page tell a user who runs the default model (its prompts are the
# synthetic tasks' own wording, so they are answered right).
DEFAULT_MODEL_NOTE = {
    "note": "This is the embedded tiny model: it knows only the synthetic world of `qwen2vl demo` "
    "(shapes and colours, counting, reading digits, finding objects with boxes, motion in short "
    "videos) and answers anything else with nonsense.",
    "examples": [
        {"attach": "qwen2vl-demo/shape_0.png", "ask": "What shape is this?"},
        {
            "attach": "qwen2vl-demo/grounding_0.png",
            "ask": "Find the blue star in the image and output its bounding box.",
        },
    ],
    "real_model": "qwen2vl serve --model Qwen/Qwen2-VL-2B-Instruct",
}


def default_model_notice(real_command: str) -> str:
    """DEFAULT_MODEL_NOTE as a few lines of text, ending with `real_command` --model ...."""
    tries = "; ".join(
        f'attach {e["attach"]} and ask "{e["ask"]}"' for e in DEFAULT_MODEL_NOTE["examples"]
    )
    model = DEFAULT_MODEL_NOTE["real_model"].split("--model ", 1)[1]
    return (
        f"{DEFAULT_MODEL_NOTE['note']}\nTry it: run `qwen2vl demo`, then {tries}.\n"
        f"For a real model: {real_command} --model {model}"
    )


def default_model_dir() -> Path:
    """Where the default model lies; CheckpointError when this install lacks it."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise CheckpointError(
            f"the default model is missing from this install ({DEFAULT_MODEL_DIR}); pass "
            "--model DIR, or rebuild it with `qwen2vl build-default-model`"
        )
    return DEFAULT_MODEL_DIR


def model_or_default(path: str | Path | None) -> Path:
    """The checkpoint directory for `path` (a directory or a repo id `Org/Name`, through
    `resolve_model`), or the default model's when it is None."""
    return resolve_model(path) if path is not None else default_model_dir()
