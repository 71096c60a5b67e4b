"""The one way to load a model for inference (Pipeline, the server, chat and bench all use it):
the checkpoint's weights, then on CPU the matmul paths this machine runs fastest (compute.py:
chosen once per process and logged, swapped in as modules), then optional weight-only int8 or int4
(or a quantised checkpoint's stored modules, quantized_checkpoint.py).
With ``tensor_parallel_size`` N > 1 (under torchrun) each process loads its shard of the LLM
(tensor_parallel.py) and logs what it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from qwen2vl.errors import CheckpointError, ConfigError
from qwen2vl.generation import tensor_parallel
from qwen2vl.generation.compute import PYTORCH_ONLY, choose_kernels, cpu_matmuls
from qwen2vl.generation.quantize import quantize_int4, quantize_int8, use_kernels
from qwen2vl.generation.quantized_checkpoint import load_quantized, stored_quantization
from qwen2vl.hub import resolve_model
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.weights import load_model

QUANTIZE = (None, "int8", "int4")


def load_for_inference(
    path: str | Path,
    dtype: str | torch.dtype | None = "bfloat16",
    device: str | torch.device = "cpu",
    *,
    quantize: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    tensor_parallel_size: int = 1,
) -> Qwen2VL:
    """A checkpoint directory or repo id ``Org/Name`` (through ``resolve_model``) as a Qwen2VL
    ready to generate (eval mode). ``dtype=None`` keeps the checkpoint's; ``quantize="int8"``
    stores the LLM's linears and lm_head as int8, ``"int4"`` the linears as int4 in groups and
    lm_head as int8 (quantize.py); a quantised checkpoint (``qwen2vl quantize``) loads as
    stored; ``progress(done, total)`` follows weight loading (see ``load_model``).
    ``tensor_parallel_size=N`` > 1, in each of the N processes torchrun starts: this process's
    shard (its device cuda:LOCAL_RANK on CUDA)."""
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize={quantize!r}: only None, 'int8' or 'int4'")
    if tensor_parallel_size < 1:
        raise ConfigError(f"tensor_parallel_size={tensor_parallel_size}: must be >= 1")
    path = resolve_model(path)
    stored = _stored_quantization(path, quantize, tensor_parallel_size)
    shard = None
    if tensor_parallel_size > 1:
        shard = tensor_parallel.join(tensor_parallel_size, device)
        device = shard.device
        model = tensor_parallel.load_sharded(path, dtype, shard, progress=progress)
    elif stored:
        model = load_quantized(path, dtype, device, progress)
    else:
        model = load_model(path, dtype=dtype, device=device, progress=progress)
    kernels = PYTORCH_ONLY
    if torch.device(device).type == "cpu":
        weights = model.model.embed_tokens.weight.dtype
        kernels = choose_kernels(weights, quantized=quantize or stored)
        model = cpu_matmuls(model, kernels)
        use_kernels(model, kernels)  # a quantised checkpoint's modules
    if quantize == "int8" and not stored:
        (tensor_parallel.quantize_int8 if shard else quantize_int8)(model, kernels=kernels)
    if quantize == "int4" and not stored:
        quantize_int4(model, kernels=kernels)
    if shard is not None:
        tensor_parallel.log_memory(model, shard)
    return model


def _stored_quantization(path: Path, quantize: str | None, tensor_parallel_size: int) -> str | None:
    """Where ``path`` holds a quantised checkpoint (quantized_checkpoint.py): "int8" or "int4",
    loaded as stored; raises for another tool's format or a conflicting request."""
    stored = stored_quantization(path)
    if stored and quantize not in (None, stored):
        raise CheckpointError(f"{path} holds {stored} weights: load it with quantize=None")
    if tensor_parallel_size > 1 and (stored or quantize == "int4"):
        raise ConfigError(
            f"tensor_parallel_size={tensor_parallel_size} with {stored or quantize} weights "
            "is not supported yet"
        )
    return stored
