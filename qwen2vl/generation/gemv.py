"""Decode matmuls on CPU (a few activation rows against bf16 or int8 weights) in a small C++ loop.

Why: decode reads every weight once per token, so its speed is the memory bandwidth. PyTorch's
bf16 and int8 kernels for one row reach about 65 % of it on a 2-core machine; ``gemv.cpp``
streams each thread's rows once and reaches 85-98 % of it in bf16, 68-98 % in int8 (by matrix
shape, measured).

The kernel is compiled on first use for this CPU (``torch.utils.cpp_extension``: a C++ compiler
and ninja, about 20 s, cached by torch under a name that includes this CPU's features, so a
shared home directory never runs code built for another CPU). If it cannot be built, or the CPU
has neither AVX2+FMA nor AVX-512, callers fall back to PyTorch's kernels after one warning.
``QWEN2VL_KERNELS=0`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

MAX_ROWS = 16  # activation rows the kernel takes; more rows are matmuls, not GEMVs
SOURCE = Path(__file__).with_name("gemv.cpp")
WEIGHT_DTYPES = (torch.bfloat16, torch.int8)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _cpu_tag() -> str:
    """A short hash of what -march=native compiles for (the CPU's feature flags)."""
    flags = platform.machine() + platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags += line
                break
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _built(cpp_extension: ModuleType, name: str) -> bool:
    try:  # a private helper of torch's, used only to decide whether to say we are building
        return any(Path(cpp_extension._get_build_directory(name, False)).glob("*.so"))
    except Exception:
        return True


@functools.cache
def _load() -> ModuleType | None:
    if os.environ.get("QWEN2VL_KERNELS", "1") == "0" or platform.machine() not in (
        "x86_64",
        "AMD64",
    ):
        return None
    try:
        from torch.utils import cpp_extension

        try:  # ninja from PyPI, when the venv's bin is not on PATH
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        name = f"qwen2vl_gemv_{_cpu_tag()}"
        if not _built(cpp_extension, name):
            print("qwen2vl: building the decode kernel for this CPU (once)", file=sys.stderr)
        flags = ["-O3", "-march=native", "-fopenmp"]
        ext = cpp_extension.load(
            name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False
        )
    except Exception as e:  # no compiler, no ninja, an unusual toolchain: PyTorch's kernels
        warnings.warn(f"qwen2vl: decode kernel unavailable ({e}); using PyTorch's", stacklevel=2)
        return None
    return ext if ext.simd_width() > 0 else None


def available() -> bool:
    """Whether the compiled kernel is usable on this machine (builds it on first call)."""
    return _load() is not None


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight, ...)`` takes the kernel: CPU decode rows, supported dtypes."""
    return (
        x.device.type == "cpu"
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and weight.dtype in WEIGHT_DTYPES
        and x.dtype in ACTIVATION_DTYPES
        and weight.is_contiguous()
        and available()
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` (each output channel times ``scales``, then ``+ bias``) in x's dtype,
    accumulated in float32. Call only where ``usable(x, weight)``."""
    out = _load().gemv(x.reshape(-1, x.shape[-1]), weight, scales, bias)
    return out.view(*x.shape[:-1], weight.shape[0])
