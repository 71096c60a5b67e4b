"""Decode matmuls on CPU (a few activation rows against bf16, int8 or int4 weights) in a small C++
loop; the one-pass unpacking of int4 weights for prefill; and the small per-token operations of
a decode step (RMSNorm, rotary, one-query attention) in one call each, and a decoder layer's
whole step in two.

Why: decode reads every weight once per token, so its speed is the memory bandwidth. PyTorch's
bf16 and int8 kernels for one row reach about 65 % of it on a 2-core machine; ``gemv.cpp``
streams each thread's rows once, prefetching the next rows: about 20 GB/s of the 23-28 GB/s two
threads read on a 2-core AVX2 machine (bf16, a 2B step's matrices in turn, measured). int8 and
int4 weights multiply int8-quantised activations as integers (widening each weight to float
would be the bottleneck, see gemv.cpp). The per-token
operations (``decode_ops.cpp``) are each several PyTorch operators on a few thousand numbers,
where dispatch, not arithmetic, sets the time.

``available()`` compiles the kernel for this CPU the first time it is asked for
(``torch.utils.cpp_extension``: a C++ compiler and ninja, about 30 s) and caches it under a name
that hashes this CPU's features, the sources, the flags and the torch and Python versions, so a
shared home directory never runs code built for another CPU or another torch. If it cannot be
built, or the CPU has neither AVX2+FMA nor AVX-512, callers take PyTorch's kernels (logged once).
``QWEN2VL_KERNELS=0`` turns it off.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

MAX_ROWS = 16  # activation rows the kernel takes; more rows are matmuls, not GEMVs
INT8_GROUP = 32  # int8 weights meet activations quantised to int8 in groups of this many (gemv.cpp)
SOURCES = [Path(__file__).with_name(n) for n in ("gemv.cpp", "decode_ops.cpp")]
HEADERS = [Path(__file__).with_name("kernels.h")]  # hashed with the sources, not compiled alone
FLAGS = ("-O3", "-march=native", "-fopenmp")
WEIGHT_DTYPES = (torch.bfloat16, torch.int8)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Run by a child interpreter: torch's builder runs `ninja` from the PATH of the process calling it.
_BUILD = """\
import sys
from torch.utils import cpp_extension
name, directory, *args = sys.argv[1:]
sources = [a for a in args if not a.startswith("-")]
flags = [a for a in args if a.startswith("-")]
cpp_extension.load(
    name, sources, build_directory=directory, extra_cflags=flags, extra_ldflags=["-fopenmp"]
)
"""


def _cpu_flags() -> str:
    """What -march=native compiles for: the machine and the CPU's feature flags."""
    flags = platform.machine() + platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return flags + line
    return flags


def _name() -> str:
    """The extension's module name: a hash of everything that changes the built library."""
    sources = [s.read_text() for s in SOURCES + HEADERS]
    key = [_cpu_flags(), *sources, " ".join(FLAGS), torch.__version__, sys.version]
    return "qwen2vl_gemv_" + hashlib.sha1("\n".join(key).encode()).hexdigest()[:12]


def _cache_dir() -> Path:
    """Where torch keeps JIT-built extensions: TORCH_EXTENSIONS_DIR, else the user cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torch_extensions"


def _build_env() -> dict[str, str]:
    """A copy of this process's environment with pip's ninja first on PATH: an unactivated
    virtualenv's bin (where `pip install ninja` puts it) is not on PATH."""
    env = dict(os.environ)
    try:
        import ninja
    except ImportError:
        return env
    env["PATH"] = ninja.BIN_DIR + os.pathsep + env.get("PATH", "")
    return env


def _build(name: str, directory: Path) -> None:
    """Compile in a child interpreter given ``_build_env()``, so this process's environment is
    never edited. Raises with the end of the compiler's output on failure."""
    directory.mkdir(parents=True, exist_ok=True)
    sources = [str(s.resolve()) for s in SOURCES]  # absolute: never taken for a flag
    argv = [sys.executable, "-c", _BUILD, name, str(directory), *sources, *FLAGS]
    done = subprocess.run(argv, env=_build_env(), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        tail = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise RuntimeError("\n".join(tail[-5:]) or f"exit status {done.returncode}")


def _import(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def _load() -> ModuleType | None:
    if os.environ.get("QWEN2VL_KERNELS", "1") == "0":
        logger.info("decode kernel turned off (QWEN2VL_KERNELS=0); using PyTorch's")
        return None
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    name = _name()
    directory = _cache_dir() / name
    library = directory / (name + (".pyd" if sys.platform == "win32" else ".so"))
    try:
        # torch's builder holds `lock` while it builds: the library may be half written
        if not library.exists() or (directory / "lock").exists():
            logger.info("building the decode kernel for this CPU (once, about 20 s): %s", library)
            _build(name, directory)
        ext = _import(name, library)
    except Exception as e:  # no compiler, no ninja, an unusual toolchain: PyTorch's kernels
        logger.warning("decode kernel unavailable (%s); using PyTorch's", e)
        return None
    if ext.simd_width() == 0:
        logger.info("decode kernel: this CPU has neither AVX2+FMA nor AVX-512; using PyTorch's")
        return None
    return ext


def available() -> bool:
    """Whether the compiled kernel is usable on this machine (builds it on the first call)."""
    return _load() is not None


def fits(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``linear(x, weight, ...)`` suits the kernel: CPU decode rows, supported dtypes.
    Says nothing of whether the kernel is available (see ``available``)."""
    return (
        x.device.type == "cpu"
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and weight.dtype in WEIGHT_DTYPES
        and x.dtype in ACTIVATION_DTYPES
        and weight.is_contiguous()
    )


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ weight.T`` (each output channel times ``scales``, then ``+ bias``) in x's dtype,
    accumulated in float32; int8 weights meet x quantised to int8 in groups of ``INT8_GROUP``
    (where K is whole groups), as llama.cpp's q8_0 does. Call only where ``fits(x, weight)``
    and ``available()``."""
    out = _load().gemv(x.reshape(-1, x.shape[-1]), weight, scales, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_int4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    bias: torch.Tensor | None,
    group: int,
) -> torch.Tensor:
    """``x @ w.T (+ bias)`` for int4 weights stored as ``quantize.quantize_groups`` packs them,
    in x's dtype; x's rows are quantised to int8 per group (see gemv.cpp). Any number of rows:
    measured here, its integer products beat dequantising and a float32 matmul up to ~250 rows
    (2B shapes), so prefill takes it below compute.MIN_ROWS too. Call only where ``available()``
    and x is a CPU tensor of an ACTIVATION_DTYPES dtype."""
    out = _load().gemv_int4(x.reshape(-1, x.shape[-1]), packed, scales, mins, bias, group)
    return out.view(*x.shape[:-1], packed.shape[0])


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int, out: torch.Tensor
) -> torch.Tensor:
    """int4 weights as float32 into ``out`` [N, Kp] (as ``quantize.dequantize_int4``, one pass
    over the weights in parallel). Call only where ``available()``."""
    _load().dequantize_int4(packed, scales, mins, group, out)
    return out


Operands = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, int]
"""One linear layer's kernel operands as its module's ``gemv_operands`` gives them: (weight,
scales, mins, bias, int4 group or 0), a bf16 or int8 weight (with scales per output row for
int8) or int4 weights packed as ``quantize.quantize_groups`` packs them."""


def attention_inputs(
    x: torch.Tensor,
    norm: torch.Tensor,
    eps: float,
    q: Operands,
    k: Operands,
    v: Operands,
    cos: torch.Tensor,
    sin: torch.Tensor,
    heads: int,
    kv_heads: int,
    head_dim: int,
) -> list[torch.Tensor]:
    """A decoder layer's decode step up to the KV cache write (see decode_ops.cpp): x [B, 1, E]
    -> [q, k, v], q [B, heads, 1, D] and k/v [B, kv_heads, 1, D], after the input RMSNorm
    (weight ``norm``), the projections and rotary on q and k. Call only where ``available()``."""
    return _load().attention_inputs(x, norm, eps, q, k, v, cos, sin, heads, kv_heads, head_dim)


def attention_output_and_mlp(
    x: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    o: Operands,
    norm: torch.Tensor,
    eps: float,
    gate: Operands,
    up: Operands,
    down: Operands,
) -> torch.Tensor:
    """The rest of that step, k/v [B, kv_heads, S, D] holding this token's: the layer's output
    x + o(attention) + down(silu(gate(h)) * up(h)), h that sum's RMSNorm (weight ``norm``).
    Call only where ``available()``."""
    return _load().attention_output_and_mlp(x, q, k, v, mask, o, norm, eps, gate, up, down)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.text.RMSNorm's output for contiguous CPU x [..., E] and a weight of x's dtype (an
    ACTIVATION_DTYPES one). Call only where ``available()``."""
    return _load().rms_norm(x, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """model.rope.apply_rotary on each head of a projection's output x [B, T, N * head_dim]
    (contiguous) with cos/sin [B, T, head_dim] of x's dtype; returns [B, T, N * head_dim].
    Call only where ``available()``."""
    return _load().rotary(x, cos, sin, head_dim)


def one_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """model.attention.one_query_attention: q [B, H, 1, D] against k/v [B, K, S, D] (views into a
    KV cache, unit stride along D), mask None or boolean [B, 1, 1, S]. Call only where
    ``available()``."""
    return _load().one_query_attention(q, k, v, mask)
