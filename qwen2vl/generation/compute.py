"""How the model's matmuls run on CPU: decode rows in the GEMV kernel, big matmuls in the fastest
dtype this CPU has.

Two regimes, chosen per call by the number of activation rows:
- Few rows (decode, up to ``gemv.MAX_ROWS``): memory-bound; ``gemv.py``'s kernel streams the bf16
  (or int8, or int4) weights near the memory bandwidth. PyTorch's kernel where it is unavailable.
- Many rows (prefill, the vision tower, from ``MIN_ROWS``): compute-bound. CPUs with bf16 matrix
  instructions (AVX512-BF16, AMX) run bf16 matmuls several times faster than float32; CPUs
  without them (AVX2, older AVX-512) several times slower (measured: 1 vs 166 GFLOP/s on an AVX2
  machine, 915 vs 209 on an AVX512-BF16 one). On the slow kind the weight is widened into a
  reused float32 workspace (a fresh buffer per call would page-fault on every use), multiplied,
  and the result cast back.
The weights stay in their storage dtype either way (memory and decode bandwidth unchanged).
A decode step's RMSNorms, rotary and one-query attention take one compiled call each
(``decode_ops.cpp``, same arithmetic): as PyTorch operators on a few thousand numbers they cost
more in dispatch than in arithmetic (a fifth of a 2B int4 step, measured). A decoder layer
whose parts all take these paths runs its step in two compiled calls around the KV cache write
(``CPUDecoderLayer``, the same bits): its ~25 Python module calls cost 4-8% of a 2B step.

Which paths a model takes is decided once, at load (``choose_kernels``: builds the kernel,
measures the matmul speed, logs the choice), and handed to the modules that take them
(``cpu_matmuls`` swaps them in); nothing is decided in ``forward``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.generation import gemv
from qwen2vl.model.text import MLP, Attention, DecoderLayer, RMSNorm
from qwen2vl.model.vision import PatchEmbed

logger = logging.getLogger(__name__)

MIN_ROWS = 64  # below this a half-precision matmul is memory-bound: never widened
_local = threading.local()


@dataclass(frozen=True)
class Kernels:
    """Which CPU paths a loaded model's matmuls take (the default: PyTorch's kernels only)."""

    gemv: bool = False  # decode rows through gemv.py's compiled kernel
    widen: bool = False  # compute-bound half-precision matmuls widened to float32


PYTORCH_ONLY = Kernels()


def workspace(*shape: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """This thread's reused float32 workspace as a tensor of ``shape`` (valid until the next
    call): a fresh buffer per call would page-fault on every use."""
    numel = 1
    for n in shape:
        numel *= n
    ws = getattr(_local, "workspace", None)
    if ws is None or ws.numel() < numel or ws.device != torch.device(device):
        ws = _local.workspace = torch.empty(numel, dtype=torch.float32, device=device)
    return ws[:numel].view(shape)


def widened(w: torch.Tensor) -> torch.Tensor:
    """w as float32, in this thread's reused workspace (valid until the next call)."""
    return workspace(*w.shape, device=w.device).copy_(w)


def many_rows(x: torch.Tensor) -> bool:
    """Whether a matmul of x's rows is compute-bound (prefill, the vision tower)."""
    return x.numel() // x.shape[-1] >= MIN_ROWS


@functools.cache
def half_matmul_is_slow(dtype: torch.dtype) -> bool:
    """Whether a 256 x 1024 x 1024 matmul in ``dtype`` is slower here than widening to float32.

    Measured once per process, the two ways interleaved, best of three each (0.2 to 1 s on a
    2-core AVX2 machine). The product is big enough that arithmetic, not thread wake-ups, sets
    the times: a 128 x 512 x 512 one on a loaded 2-core machine timed the scheduler, and the
    widened way (four ops to the native one) lost there while 5x faster on the ViT's matmuls."""
    x = torch.randn(4 * MIN_ROWS, 1024).to(dtype)
    w = torch.randn(1024, 1024).to(dtype)
    native, wide = _best_times(
        lambda: F.linear(x, w), lambda: F.linear(x.float(), widened(w)).to(dtype)
    )
    return native > wide


def _best_times(*fns, rounds: int = 3) -> list[float]:
    """The shortest of ``rounds`` timed calls of each fn, called in turn after one warm-up each."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [min(ts) for ts in times]


@functools.cache
def choose_kernels(dtype: torch.dtype, *, quantized: str | None = None) -> Kernels:
    """The CPU paths for a model with ``dtype`` weights (and activations), ``quantized`` to
    "int8" or "int4" or not: the decode kernel where its weights can use it (built here if need
    be), float32 widening where this CPU's ``dtype`` matmuls are slow (measured here). Once per
    process; logged."""
    kernels = Kernels(
        gemv=(quantized is not None or dtype in gemv.WEIGHT_DTYPES) and gemv.available(),
        widen=dtype != torch.float32 and half_matmul_is_slow(dtype),
    )
    name = str(dtype).removeprefix("torch.")
    logger.info(
        "CPU matmuls for %s%s weights: decode rows by %s; prefill and vision matmuls in %s",
        f"{quantized}/" if quantized else "",
        name,
        "qwen2vl's kernel" if kernels.gemv else "PyTorch",
        f"float32 (this CPU's {name} matmuls are slow)" if kernels.widen else name,
    )
    return kernels


class CPULinear(nn.Linear):
    """An nn.Linear taking the CPU paths above. Built around an existing Linear: it holds that
    Linear's own weight and bias Parameters (so ties such as lm_head = embed_tokens survive)."""

    def __init__(self, linear: nn.Linear, kernels: Kernels):
        # on meta, then the original Parameters replace the placeholders: nothing is copied
        super().__init__(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta"
        )
        self.weight, self.bias = linear.weight, linear.bias
        self.kernels = kernels

    def gemv_operands(self, x: torch.Tensor) -> gemv.Operands | None:
        """The decode kernel's operands for x's rows, where the kernel takes them."""
        if self.kernels.gemv and gemv.fits(x, self.weight):
            return self.weight, None, None, self.bias, 0
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv_operands(x) is not None:
            return gemv.linear(x, self.weight, bias=self.bias)
        if not (self.kernels.widen and many_rows(x)):
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), widened(self.weight), bias).to(x.dtype)


class CPUPatchEmbed(PatchEmbed):
    """PatchEmbed taking the float32 path on CPUs with slow half-precision matmuls. Built around
    an existing PatchEmbed: it holds that module's own ``proj`` (same key, same Parameter)."""

    def __init__(self, embed: PatchEmbed, kernels: Kernels):
        nn.Module.__init__(self)  # not PatchEmbed.__init__: that would build a second Conv3d
        self.shape, self.proj, self.kernels = embed.shape, embed.proj, kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.kernels.widen and many_rows(x)):
            return super().forward(x)
        w = self.proj.weight
        return F.linear(x.float(), widened(w.flatten(1))).to(w.dtype)


def decode_step(x: torch.Tensor, kernels: Kernels) -> bool:
    """Whether x [..., E] is a CPU decode step's few rows that the compiled per-token operations
    take: kernel built, inference (they have no backward), a dtype they know."""
    return (
        kernels.gemv
        and x.device.type == "cpu"
        and x.numel() <= gemv.MAX_ROWS * x.shape[-1]
        and x.dtype in gemv.ACTIVATION_DTYPES
        and not torch.is_grad_enabled()
    )


class CPURMSNorm(RMSNorm):
    """RMSNorm in one compiled call for decode rows. Holds the original module's weight."""

    def __init__(self, norm: RMSNorm, kernels: Kernels):
        nn.Module.__init__(self)  # not RMSNorm.__init__: the original Parameter is kept
        self.weight, self.eps, self.kernels = norm.weight, norm.eps, kernels

    def compiled(self, x: torch.Tensor) -> bool:
        """Whether x takes the compiled call."""
        return decode_step(x, self.kernels) and x.dtype == self.weight.dtype and x.is_contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled(x):
            return gemv.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


class CPUAttention(Attention):
    """Attention whose decode step (one token a row, a KV cache) takes the rotary and the
    one-query attention in one compiled call each; everything else is Attention's forward.
    Holds the original module's projections."""

    def __init__(self, attn: Attention, kernels: Kernels):
        nn.Module.__init__(self)  # not Attention.__init__: the original projections are kept
        self.layer_idx, self.kernels = attn.layer_idx, kernels
        self.num_heads, self.num_kv_heads, self.head_dim = (
            attn.num_heads,
            attn.num_kv_heads,
            attn.head_dim,
        )
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
        )

    def compiled(self, x, cos, *, cu_seqlens=None, kv_cache=None) -> bool:
        """Whether this call is a decode step the compiled calls take."""
        one_token = x.shape[1] == 1 and kv_cache is not None and cu_seqlens is None
        # cos/sin of x's dtype: the reference's products round to it
        return one_token and cos.dtype == x.dtype and decode_step(x, self.kernels)

    def forward(self, x, cos, sin, *, mask=None, cu_seqlens=None, kv_cache=None):
        if not self.compiled(x, cos, cu_seqlens=cu_seqlens, kv_cache=kv_cache):
            return super().forward(x, cos, sin, mask=mask, cu_seqlens=cu_seqlens, kv_cache=kv_cache)
        B, D = x.shape[0], self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, 1, heads * D]
        q = gemv.rotary(q, cos, sin, D).view(B, self.num_heads, 1, D)
        k = gemv.rotary(k, cos, sin, D).view(B, self.num_kv_heads, 1, D)
        k, v = kv_cache.update(self.layer_idx, k, v.view(B, self.num_kv_heads, 1, D))
        out = gemv.one_query_attention(q, k, v, mask)  # [B, H, 1, D]
        return self.o_proj(out.view(B, 1, -1))


class CPUDecoderLayer(DecoderLayer):
    """A decoder layer whose decode step runs in two compiled calls around the KV cache write
    (``gemv.attention_inputs``, ``gemv.attention_output_and_mlp``): the same operations as its
    CPU modules one by one, the same output bits, without ~25 Python module calls. Only where
    every part would take the compiled path anyway (its RMSNorms, CPUAttention, a plain MLP,
    linears that give kernel operands: not a LoRA or a tensor-parallel shard); everything else
    is DecoderLayer's forward. Holds the original layer's submodules."""

    def __init__(self, layer: DecoderLayer, kernels: Kernels):
        nn.Module.__init__(self)  # not DecoderLayer.__init__: the original submodules are kept
        self.self_attn, self.mlp, self.kernels = layer.self_attn, layer.mlp, kernels
        self.input_layernorm = layer.input_layernorm
        self.post_attention_layernorm = layer.post_attention_layernorm

    def forward(self, x, cos, sin, *, mask=None, cu_seqlens=None, kv_cache=None, tap=None):
        ops = None if tap is not None else self._operands(x, cos, cu_seqlens, kv_cache)
        if ops is None:
            return super().forward(
                x, cos, sin, mask=mask, cu_seqlens=cu_seqlens, kv_cache=kv_cache, tap=tap
            )
        attn, norm, post_norm = self.self_attn, self.input_layernorm, self.post_attention_layernorm
        q, k, v = gemv.attention_inputs(
            x, norm.weight, norm.eps, *ops[:3], cos, sin,
            attn.num_heads, attn.num_kv_heads, attn.head_dim,
        )  # fmt: skip
        k, v = kv_cache.update(attn.layer_idx, k, v)
        return gemv.attention_output_and_mlp(
            x, q, k, v, mask, ops[3], post_norm.weight, post_norm.eps, *ops[4:]
        )

    def _operands(self, x, cos, cu_seqlens, kv_cache) -> list[gemv.Operands] | None:
        """The seven linears' kernel operands (q, k, v, o, gate, up, down) where every part of
        this step takes the compiled path (asked with x: the norms' and attention's inputs have
        its shape and dtype); else None."""
        attn, mlp = self.self_attn, self.mlp
        norms = self.input_layernorm, self.post_attention_layernorm
        if not (
            type(attn) is CPUAttention
            and attn.compiled(x, cos, cu_seqlens=cu_seqlens, kv_cache=kv_cache)
            and type(mlp) is MLP
            and all(type(n) is CPURMSNorm and n.compiled(x) for n in norms)
        ):
            return None
        ops = []
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                       mlp.up_proj, mlp.down_proj):  # fmt: skip
            operands = getattr(linear, "gemv_operands", None)
            ops.append(operands(x) if operands else None)  # x: only its rows and dtype count
        return None if any(o is None for o in ops) else ops


def _cpu_module(module: nn.Module, kernels: Kernels) -> nn.Module | None:
    if type(module) is nn.Linear:  # exact types: LoRA, int8 and other subclasses keep theirs
        return CPULinear(module, kernels)
    if type(module) is PatchEmbed:
        return CPUPatchEmbed(module, kernels)
    if type(module) is RMSNorm:
        return CPURMSNorm(module, kernels)
    if type(module) is Attention:
        return CPUAttention(module, kernels)
    if type(module) is DecoderLayer:
        return CPUDecoderLayer(module, kernels)
    return None


def cpu_matmuls(model: nn.Module, kernels: Kernels) -> nn.Module:
    """Replace every plain nn.Linear, the patch embedding and the LLM's RMSNorms, attention
    modules and decoder layers under ``model`` by their CPU modules (in place, on the parent);
    returns ``model``, or its replacement if it is one itself.

    The replacements hold the same Parameter objects under the same names, so state dict keys,
    tied weights and outputs on PyTorch's path are unchanged."""
    for parent in reversed(list(model.modules())):  # children first: parents keep the swaps
        for name, child in list(parent.named_children()):
            fast = _cpu_module(child, kernels)
            if fast is not None:
                setattr(parent, name, fast)
    return _cpu_module(model, kernels) or model
