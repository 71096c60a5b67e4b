"""Checkpoints: a Hugging Face model directory plus the trainer's state, written atomically.

    OUT/checkpoint-STEP/
      config.json, model.safetensors (or shards)   the model, LoRA merged: load_model,
                                                   transformers and the server read it
      tokenizer.json, preprocessor_config.json ... copied from the source checkpoint
      trainer/trainable.safetensors                trainable weights, exact, under their runtime
                                                   names (LoRA adapters unmerged)
      trainer/optimizer.safetensors + .json        AdamW moments (tensors) and param groups (JSON)
      trainer_state.json                           step, data position, schedule, config

No pickle anywhere: tensors go to safetensors and everything else to JSON. A checkpoint is built
in OUT/.partial/ and renamed into place only when complete, so a process killed mid-save leaves
the previous checkpoints as they were; trainer_state.json is written last inside it. Old
checkpoints leave the same way: renamed into OUT/.partial/ first, deleted there after, so no
checkpoint-STEP directory ever holds trainer_state.json without its weights.

Resuming rebuilds the model from the source checkpoint (frozen weights, exact), applies the same
stage and LoRA, then loads trainer/trainable.safetensors; the HF weights are for users.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.tokenizer import ASSETS_DIR
from qwen2vl.train.lora import merge_lora_state
from qwen2vl.weights import DTYPES, save_pretrained

STATE_FILE = "trainer_state.json"
PARTIAL = ".partial"
# Everything a checkpoint directory needs besides weights, copied from the source when present.
PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "generation_config.json",
)
_STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
_RESUME_FIX = (
    "resume from another checkpoint-STEP directory, or with --resume auto for the newest "
    "complete one (move this directory out of the output directory if auto chose it)"
)


@dataclass
class Checkpoint:
    path: Path
    state: dict[str, Any]  # trainer_state.json
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # full, name-keyed optimizer state dict


def write_model(
    path: str | Path,
    cfg: Qwen2VLConfig,
    state: dict[str, torch.Tensor],
    *,
    source: str | Path | None,
    dtype: str = "float32",
    lora_scaling: float | None = None,
) -> None:
    """A plain Hugging Face model directory from a (possibly LoRA) full state dict."""
    if lora_scaling is not None:
        state = merge_lora_state(state, lora_scaling)
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    expected = set(model.state_dict()) - (
        {"lm_head.weight"} if cfg.text.tie_word_embeddings else set()
    )
    missing, unexpected = expected - set(state), set(state) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"state does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    save_pretrained(model, path, dtype=DTYPES[dtype])
    copy_processor_files(source, path)


def copy_processor_files(source: str | Path | None, path: str | Path) -> None:
    """The source's tokenizer, template and preprocessor files; the bundled tokenizer when the
    source has none (so transformers and our Processor both load the result)."""
    source = Path(source) if source is not None else None
    for name in PROCESSOR_FILES:
        if source is not None and (source / name).is_file():
            shutil.copyfile(source / name, Path(path) / name)
    if not (Path(path) / "tokenizer.json").is_file():
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(ASSETS_DIR / name, Path(path) / name)


def save_checkpoint(
    path: str | Path,
    *,
    cfg: Qwen2VLConfig,
    model_state: dict[str, torch.Tensor],
    trainable: list[str],
    optimizer_state: dict[str, Any],
    trainer_state: dict[str, Any],
    source: str | Path | None,
    dtype: str = "float32",
    lora_scaling: float | None = None,
) -> Path:
    """Write a whole checkpoint next to its final place, then rename it in (rank 0 only)."""
    path = Path(path)
    partial = path.parent / PARTIAL / path.name
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write_model(partial, cfg, model_state, source=source, dtype=dtype, lora_scaling=lora_scaling)
    (partial / "trainer").mkdir()
    weights = {n: model_state[n].contiguous() for n in trainable}
    save_file(weights, str(partial / "trainer" / "trainable.safetensors"))
    tensors, meta = flatten_optimizer_state(optimizer_state)
    save_file(tensors, str(partial / "trainer" / "optimizer.safetensors"))
    _write_json(partial / "trainer" / "optimizer.json", meta)
    _write_json(partial / STATE_FILE, trainer_state)  # last: marks the checkpoint complete
    _publish(partial, path)
    return path


def _publish(partial: Path, path: Path) -> None:
    """fsync the files, then swap the directory into place (an older one of that name goes)."""
    for f in partial.rglob("*"):
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
    old = _move_aside(path, ".old") if path.exists() else None
    os.replace(partial, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _remove_empty_partial(path.parent)


def _move_aside(path: Path, suffix: str) -> Path:
    """Rename a checkpoint into OUT/.partial/ in one atomic step: from here on it is not listed,
    and clean_partial removes it if we are killed before it is deleted."""
    aside = path.parent / PARTIAL / f"{path.name}{suffix}"
    shutil.rmtree(aside, ignore_errors=True)
    aside.parent.mkdir(exist_ok=True)
    os.replace(path, aside)
    return aside


def _remove_empty_partial(output: Path) -> None:
    with contextlib.suppress(OSError):
        (output / PARTIAL).rmdir()


def load_checkpoint(path: str | Path) -> Checkpoint:
    """A complete checkpoint; CheckpointError names what is missing or broken and what to do."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory; {_RESUME_FIX}")
    if not (path / STATE_FILE).is_file():
        raise _incomplete(
            path, f"it has no {STATE_FILE} (its save never finished, or it was pruned)"
        )
    state = _read_part(path, STATE_FILE, _read_json_object)
    trainable = _read_part(path, "trainer/trainable.safetensors", load_file)
    tensors = _read_part(path, "trainer/optimizer.safetensors", load_file)
    meta = _read_part(path, "trainer/optimizer.json", _read_json_object)
    return Checkpoint(path, state, trainable, unflatten_optimizer_state(tensors, meta))


def _read_part(path: Path, name: str, read: Callable[[str], Any]) -> Any:
    file = path / name
    if not file.is_file():
        raise _incomplete(path, f"{name} is missing")
    try:
        return read(str(file))
    except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
        raise _incomplete(path, f"{name} is unreadable ({e})") from e


def _read_json_object(file: str) -> dict[str, Any]:
    value = json.loads(Path(file).read_text())
    if not isinstance(value, dict):
        raise ValueError(f"a JSON object was expected, not {type(value).__name__}")
    return value


def _incomplete(path: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a complete training checkpoint: {what}; {_RESUME_FIX}")


def flatten_optimizer_state(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A name-keyed optimizer state dict -> (tensors for safetensors, JSON for the rest)."""
    tensors, scalars = {}, {}
    for name, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{name}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{name}::{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]):
    state: dict[str, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        name, _, key = flat.rpartition("::")
        state.setdefault(name, {})[key] = value
    groups = [
        {**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def latest_checkpoint(output: str | Path) -> Path | None:
    """The complete checkpoint-STEP directory with the highest STEP, or None."""
    found = checkpoints(output)
    return found[-1] if found else None


def checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoint directories in step order."""
    output = Path(output)
    if not output.is_dir():
        return []
    steps = []
    for d in output.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / STATE_FILE).is_file():
            steps.append((int(m.group(1)), d))
    return [d for _, d in sorted(steps)]


def prune_checkpoints(output: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; a kill at any instant is safe (_move_aside)."""
    for old in checkpoints(output)[:-keep]:
        shutil.rmtree(_move_aside(old, ".pruned"), ignore_errors=True)
    _remove_empty_partial(Path(output))


def clean_partial(output: str | Path) -> None:
    """Remove what a killed save or prune left behind."""
    shutil.rmtree(Path(output) / PARTIAL, ignore_errors=True)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if isinstance(value, (tuple, set)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in JSON")
