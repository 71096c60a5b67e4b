"""Quantised checkpoints: int8 or int4 weights written once (``qwen2vl quantize``) and loaded
memory-mapped by ``load_for_inference``, with no re-quantising at load.

The format is a Hugging Face checkpoint directory (config.json, safetensors, tokenizer and
processor files) in which each quantised linear is stored as the buffers of its module in
``quantize.py``, under the module's name NAME:

    int8 (Int8Linear): NAME.weight int8 [N, K]; NAME.scales float32 [N]
    int4 (Int4Linear): NAME.weight uint8 [N, Kp / 2], two weights a byte in quantize.py's
                       layout (Kp: K padded to the group); NAME.scales, NAME.mins float16
                       [N, Kp / group_size]; w = u * scale + min
    both:              NAME.bias (where the linear has one) in the checkpoint's dtype

Every other tensor is as in a plain checkpoint, in ``torch_dtype``. ``tie_word_embeddings`` is
false: lm_head is stored (quantised) apart from the embedding. config.json says so:

    "quantization_config": {
      "quant_method": "qwen2vl",      # this format; any other method is refused, see below
      "bits": 4,                      # the scheme: 8 (every module int8) or 4 (LLM linears int4,
                                      #   lm_head int8)
      "group_size": 64,               # int4 weights per scale and min
      "modules": {"model.layers.0.self_attn.q_proj": 4, ..., "lm_head": 8}   # name -> bits
    }

transformers does not load these. A checkpoint quantised by another tool (AWQ, GPTQ, ...:
another ``quant_method``) is refused before any weight is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import CheckpointError
from qwen2vl.generation.quantize import (
    GROUP,
    Int4Linear,
    Int8Linear,
    quantize_int4,
    quantize_int8,
    quantized_modules,
)
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.weights import (
    check_keys,
    load_model,
    quantization_config,
    read_state_dict,
    resolve_dtype,
    save_pretrained,
)

METHOD = "qwen2vl"
BITS = {"int8": 8, "int4": 4}
GROUPS = (64, 128)  # the group sizes gemv.cpp's int4 kernel takes


def stored_quantization(path: str | Path) -> str | None:
    """ "int8" or "int4" for a checkpoint in this format, None for an unquantised one; raises
    CheckpointError for one quantised by another method. Reads config.json only."""
    spec = _spec(Path(path))
    return None if spec is None else f"int{spec['bits']}"


def save_quantized(
    source: str | Path,
    output: str | Path,
    *,
    bits: int,
    dtype: str | torch.dtype = "bfloat16",
    group: int = GROUP,
) -> Path:
    """The checkpoint at ``source`` with its LLM quantised to ``bits`` (8 or 4; see the module
    docstring), its other tensors in ``dtype``, written to ``output`` (config.json included;
    the tokenizer and processor files are the caller's to copy)."""
    if bits not in BITS.values():
        raise ValueError(f"bits={bits}: only 8 or 4")
    model = load_model(source, dtype=dtype)
    if bits == 8:
        quantize_int8(model)
    else:
        quantize_int4(model, group=group)
    model.cfg.text.tie_word_embeddings = False  # lm_head is its own (quantised) tensor now
    save_pretrained(model, output)
    config_file = Path(output) / "config.json"
    config = json.loads(config_file.read_text())
    config["torch_dtype"] = str(resolve_dtype(dtype, model.cfg)).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": METHOD,
        "bits": bits,
        "group_size": group,
        "modules": {
            name: 4 if isinstance(m, Int4Linear) else 8
            for name, m in quantized_modules(model).items()
        },
    }
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    return Path(output)


def load_quantized(
    path: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> Qwen2VL:
    """A checkpoint in this format as a Qwen2VL in eval mode: built on the meta device, its
    linears swapped as the quantisers swap them, then every stored tensor assigned (memory-mapped
    on CPU: nothing is copied or re-quantised). ``dtype`` applies to the unquantised tensors."""
    path = Path(path)
    spec = _spec(path)
    if spec is None:
        raise CheckpointError(f"{path}: not a quantised checkpoint (no quantization_config)")
    cfg = Qwen2VLConfig.from_file(path / "config.json")
    dtype = resolve_dtype(dtype, cfg)
    with torch.device("meta"):
        model = Qwen2VL(cfg)
        _swap(model, spec["modules"], spec["group_size"], path)
    state = read_state_dict(path)
    check_keys(model, state)
    stored = {f"{name}.{b}" for name in spec["modules"] for b in ("weight", "scales", "mins")}
    for i, key in enumerate(state, 1):
        wanted = None if key in stored else dtype  # quantised buffers keep their dtypes
        state[key] = state[key].to(device=device, dtype=wanted)
        if progress is not None:
            progress(i, len(state))
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    return model.eval()


def _spec(path: Path) -> dict | None:
    """config.json's quantization_config, checked to be this format's; None where absent."""
    spec = quantization_config(path)
    if not spec:
        return None
    method = spec.get("quant_method") if isinstance(spec, dict) else None
    if method != METHOD:
        raise CheckpointError(
            f"{path}: {method or 'unknown'} quantised checkpoints (quantization_config."
            f"quant_method={method!r}) are not supported yet; load the unquantised model with "
            "quantize='int8' or 'int4' (or write one with `qwen2vl quantize`)"
        )
    bits, group, modules = spec.get("bits"), spec.get("group_size"), spec.get("modules")
    if (
        bits not in BITS.values()
        or group not in GROUPS
        or not isinstance(modules, dict)
        or not set(modules.values()) <= {4, 8}
    ):
        raise CheckpointError(
            f"{path}: quantization_config has bits={bits!r}, group_size={group!r}; this "
            f"format takes bits 8 or 4, group_size one of {GROUPS} and modules name -> 4 or 8"
        )
    return spec


def _swap(model: nn.Module, modules: dict[str, int], group: int, path: Path) -> None:
    """Each named nn.Linear of the (meta) model replaced by its quantised module."""
    for name, bits in modules.items():
        parent_name, _, child_name = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child_name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise CheckpointError(
                f"{path}: quantization_config names {name!r}, which is no linear of this model"
            )
        quantized = Int4Linear(linear, group=group) if bits == 4 else Int8Linear(linear)
        setattr(parent, child_name, quantized)
