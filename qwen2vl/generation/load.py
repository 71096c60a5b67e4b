"""The one way to load a model for inference (Pipeline, the server, chat and bench all use it):
the checkpoint's weights, then on CPU the matmul paths this machine runs fastest (compute.py:
chosen once per process and logged, swapped in as modules), then optional weight-only int8.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from qwen2vl.generation.compute import PYTORCH_ONLY, choose_kernels, cpu_matmuls
from qwen2vl.generation.quantize import quantize_int8
from qwen2vl.hub import resolve_model
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.weights import load_model

QUANTIZE = (None, "int8")


def load_for_inference(
    path: str | Path,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device = "cpu",
    *,
    quantize: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Qwen2VL:
    """A checkpoint directory or repo id ``Org/Name`` (through ``resolve_model``) as a Qwen2VL
    ready to generate (eval mode). ``dtype=None`` keeps the checkpoint's; ``quantize="int8"``
    stores the LLM's linears and lm_head as int8; ``progress(done, total)`` follows weight
    loading (see ``load_model``)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: only None or 'int8'")
    model = load_model(resolve_model(path), dtype=dtype, device=device, progress=progress)
    kernels = PYTORCH_ONLY
    if torch.device(device).type == "cpu":
        weights = model.model.embed_tokens.weight.dtype
        kernels = choose_kernels(weights, int8=quantize == "int8")
        model = cpu_matmuls(model, kernels)
    if quantize == "int8":
        quantize_int8(model, kernels=kernels)
    return model
