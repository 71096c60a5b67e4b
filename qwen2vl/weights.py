"""Checkpoint I/O: Hugging Face layout, safetensors only (memory-mapped), strict key matching.

Accepted key layouts (the same for Qwen2-VL and Qwen2.5-VL), mapped by one prefix table:
- official releases: ``model.*`` (LLM), ``visual.*`` (ViT), ``lm_head.weight``;
- transformers >= 4.52 / 5 runtime names: ``model.language_model.*``, ``model.visual.*``.
We always write the official layout, which every transformers version and vLLM read.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.model.qwen2vl import Qwen2VL

log = logging.getLogger(__name__)

# (checkpoint prefix, our prefix); first match wins, so longer prefixes come first.
PREFIXES = [
    ("model.language_model.", "model."),
    ("model.visual.", "visual."),
    ("model.lm_head.", "lm_head."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
]
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def canonical_key(key: str) -> str:
    for theirs, ours in PREFIXES:
        if key.startswith(theirs):
            return ours + key[len(theirs) :]
    return key


def resolve_dtype(dtype: str | torch.dtype | None, cfg: Qwen2VLConfig) -> torch.dtype:
    """None means the checkpoint's own dtype (config torch_dtype)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(
                f"dtype {dtype} is not supported; use float32, bfloat16 or float16"
            )
        return dtype
    name = cfg.torch_dtype if dtype is None else str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise CheckpointError(f"dtype {name!r} is not supported; use float32, bfloat16 or float16")
    return DTYPES[name]


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: not a valid safetensors index ({e})") from e
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{path}: shards listed in {INDEX} are missing: {missing}")
        return files
    if (path / SINGLE).is_file():
        return [path / SINGLE]
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise CheckpointError(
            f"{path} holds only pickled PyTorch weights (.bin/.pt), which qwen2vl does not load "
            "(unpickling runs arbitrary code). Convert once with transformers: "
            "`Qwen2VLForConditionalGeneration` (or `Qwen2_5_VLForConditionalGeneration`)"
            "`.from_pretrained(path).save_pretrained(out, "
            "safe_serialization=True)`, then load `out`."
        )
    raise CheckpointError(f"{path}: no {SINGLE} or {INDEX} found")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, memory-mapped, under our key names."""
    out: dict[str, torch.Tensor] = {}
    for file in checkpoint_files(Path(path)):
        with open_safetensors(file) as f:
            for key in f.keys():
                out[canonical_key(key)] = f.get_tensor(key)
    return out


def open_safetensors(file: Path):
    """``safe_open`` (memory-mapped), a damaged file reported as a CheckpointError."""
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{file}: unreadable safetensors file ({e}); it may be truncated "
            "or corrupt — download or save it again"
        ) from e


def load_model(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Qwen2VL:
    """Open a Qwen2-VL or Qwen2.5-VL checkpoint directory (Hugging Face layout) as a ``Qwen2VL``
    in eval mode.

    ``progress(done, total)`` is called after each tensor is placed (the CLI draws a bar).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    _refuse_quantized(path)
    cfg = Qwen2VLConfig.from_file(path / "config.json")
    dtype = resolve_dtype(dtype, cfg)
    state = read_state_dict(path)
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    check_keys(model, state)
    if cfg.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for i, k in enumerate(state, 1):
        state[k] = state[k].to(device=device, dtype=dtype)
        if progress is not None:
            progress(i, len(state))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def quantization_config(path: Path) -> Any:
    """config.json's quantization_config (top level, or under text_config as transformers 5
    writes it); None where absent or where config.json cannot be read (its loader says why)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    text = config.get("text_config")
    nested = text.get("quantization_config") if isinstance(text, dict) else None
    return config.get("quantization_config") or nested or None


def _refuse_quantized(path: Path) -> None:
    """A quantised checkpoint holds other tensors than the float model: one line, not a key list."""
    spec = quantization_config(path)
    if spec is None:
        return
    method = spec.get("quant_method") if isinstance(spec, dict) else spec
    raise CheckpointError(
        f"{path}: a quantised checkpoint (quantization_config.quant_method={method!r}); "
        "load_model reads float weights only. qwen2vl's own int8/int4 checkpoints load with "
        "qwen2vl.load_for_inference; other formats are not supported yet"
    )


def check_keys(model: Qwen2VL, state: dict[str, torch.Tensor]) -> None:
    """One error listing every missing, unexpected and wrongly shaped tensor."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if model.cfg.text.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)}, config wants {tuple(expected[k])}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k]
    )
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{title} ({len(items)}): " + ", ".join(shown))
    if problems:
        raise CheckpointError("checkpoint does not match its config.json; " + "; ".join(problems))


def save_pretrained(
    model: Qwen2VL,
    path: str | Path,
    *,
    max_shard_bytes: int = 5 * 2**30,
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json and safetensors (sharded above max_shard_bytes) in the official layout.

    Files are written into a temporary directory beside ``path`` and moved in at the end, so an
    interruption never leaves a half-written weight file under ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    if model.cfg.text.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    cfg = model.cfg.to_hf()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_shards(state, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        path.mkdir(exist_ok=True)
        for stale in (SINGLE, INDEX):  # a previous save may have used the other layout
            (path / stale).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(f, path / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_shards(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=meta)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
