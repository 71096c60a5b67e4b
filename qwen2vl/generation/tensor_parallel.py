"""Tensor-parallel inference: the LLM split across the processes ``torchrun`` starts.

    torchrun --nproc-per-node N -m qwen2vl chat --model DIR --tensor-parallel-size N "question"
    Pipeline.from_pretrained(DIR, tensor_parallel_size=N)     # in every process torchrun starts
    several machines: torchrun --nnodes M --nproc-per-node G --rdzv-backend c10d
                      --rdzv-endpoint HOST:PORT ... --tensor-parallel-size M*G

Letters: N ranks (the tensor-parallel size), r this rank, H query heads, K key/value heads,
I MLP width, V vocabulary, E hidden size.

The split is Megatron's: q/k/v (with their biases) and gate/up keep their output rows of rank r
(heads r*H/N.. and kv heads r*K/N.., so each rank's query heads find their kv heads locally),
o_proj and down_proj the matching input columns; each rank's attention and MLP output is a
partial sum, added across ranks by one all-reduce after o_proj and one after down_proj. The
embedding and lm_head are split by vocabulary rows (ceil(V/N) a rank, the last padded with zero
rows): a token outside rank r's rows embeds as zeros there, so an all-reduce gives each token its
row; each rank's logits [.., V/N] are all-gathered into [.., V]. Norms and the ViT are whole on
every rank, which computes the same visual features (no broadcast). Every rank so ends each layer
with the same activations and the same logits, and the generation loop runs unchanged on every
rank: same inputs, same random state (``join`` hands rank 0's to the others), same tokens.

Why this shape (``benchmarks/tensor_parallel.py``: 2 CPU ranks on gloo, bf16, 2B shapes, one
decode row; a shared 2-core machine, so read the ratios, not the times):
- Plain collectives (``torch.distributed.all_reduce`` / ``all_gather``), not DTensor's
  ``ColwiseParallel`` / ``RowwiseParallel``: the 2B MLP took 26-27 ms under DTensor against
  13-14 ms as plain shards + all_reduce with the same F.linear, and 10-11 ms with the decode
  kernel, which needs plain weights: the shards stay ``nn.Linear`` so the CPU kernels and int8
  (``compute.py``, ``quantize.py``) swap them like any other Linear.
- Embedding and lm_head split by vocabulary rather than replicated: 2B's lm_head took 135 ms and
  445 MiB a rank replicated, 57 ms and 223 MiB split + all_gather; the split embedding's
  all-reduce costs 0.6 ms a step. They are 15 % (2B), 14 % (7B), 3 % (72B) of the LLM.
- The ViT whole on every rank, not rank 0 + a broadcast of its features: the broadcast is cheap
  (0.4-0.5 ms for a 448x448 image's 256 features) and would free the ViT's 1.3 GiB on ranks
  1..N-1 only, where it buys nothing: KV caches are equal on all ranks (each holds K/N heads of
  every sequence), so rank 0, which holds the ViT either way, bounds the batch. Replicated, no
  rank waits and no extra collective or code path exists.
Measured memory (same run, 4 of 2B's 28 layers): LLM tensors 802 MiB at TP 1, 401 MiB on each of
2 ranks, the ViT's 1269 MiB on each.

The model is built on the meta device from a sharded config (``shard_config``: local heads, kv
heads and MLP width, so KV caches sized from ``model.cfg.text`` hold this rank's heads), with the
modules that communicate swapped in; then each rank reads only its slices of the safetensors
files (``load_sharded``). int8 (``quantize_int8``) gives o_proj and down_proj, split along their
input, the scale of each whole row (the max over all ranks), so TP N quantises as TP 1 does.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import Qwen2VLConfig, TextConfig
from qwen2vl.errors import CheckpointError, ConfigError
from qwen2vl.generation.compute import PYTORCH_ONLY, Kernels
from qwen2vl.generation.quantize import Int8Linear
from qwen2vl.generation.quantize import quantize_int8 as quantize_int8_whole
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.model.text import MLP, Attention
from qwen2vl.weights import (
    canonical_key,
    check_keys,
    checkpoint_files,
    open_safetensors,
    resolve_dtype,
)

log = logging.getLogger(__name__)

# The dimension of each split LLM tensor that is divided among ranks (0: output rows, 1: input
# columns), by its name inside a decoder layer; every other tensor is whole on every rank.
LAYER_SPLITS = {
    "self_attn.q_proj.weight": 0,
    "self_attn.q_proj.bias": 0,
    "self_attn.k_proj.weight": 0,
    "self_attn.k_proj.bias": 0,
    "self_attn.v_proj.weight": 0,
    "self_attn.v_proj.bias": 0,
    "self_attn.o_proj.weight": 1,
    "mlp.gate_proj.weight": 0,
    "mlp.up_proj.weight": 0,
    "mlp.down_proj.weight": 1,
}
VOCAB_SPLITS = ("model.embed_tokens.weight", "lm_head.weight")  # by rows, the last rank padded
HEAD = "lm_head.shard.weight"  # lm_head's local projection; the checkpoint's lm_head.weight


@dataclass(frozen=True)
class Shard:
    """This process's place: rank r of N, the process group (None: the default one), device."""

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    device: torch.device = torch.device("cpu")

    def vocab_rows(self, vocab: int) -> int:
        """Rows of the embedding and lm_head each rank holds (the last one padded)."""
        return math.ceil(vocab / self.size)


# ---- the process group -----------------------------------------------------------------------


def join(size: int, device: str | torch.device = "cpu") -> Shard:
    """This process's shard of a tensor-parallel group of ``size`` torchrun processes: joins
    torchrun's process group (gloo on CPU, NCCL on CUDA, where each rank takes device
    cuda:LOCAL_RANK whatever index ``device`` names) unless one exists, and gives every rank
    rank 0's random state."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != size:
        raise ConfigError(
            f"tensor_parallel_size={size} needs {size} processes, one per shard, but "
            f"WORLD_SIZE={world}: launch with `torchrun --nproc-per-node {size} ...`"
        )
    device = torch.device(device)
    if device.type == "cuda":  # one device per rank, whichever index was asked for
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"rank with LOCAL_RANK={local} has no CUDA device of its own: this machine "
                f"has {torch.cuda.device_count()}; start at most that many processes on it"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    shard = Shard(dist.get_rank(), size, None, device)
    _share_random_state(shard)
    return shard


def _share_random_state(shard: Shard) -> None:
    """Sampling without a seed draws from the global generators: the same draws on every rank."""
    cpu = torch.get_rng_state().to(shard.device)
    dist.broadcast(cpu, 0, group=shard.group)
    torch.set_rng_state(cpu.cpu())
    if shard.device.type == "cuda":
        gpu = torch.cuda.get_rng_state(shard.device).to(shard.device)
        dist.broadcast(gpu, 0, group=shard.group)
        torch.cuda.set_rng_state(gpu.cpu(), shard.device)


# ---- the sharded model ---------------------------------------------------------------------


@dataclass
class ShardTextConfig(TextConfig):
    """One rank's part of the decoder: ``num_attention_heads``, ``num_key_value_heads`` and
    ``intermediate_size`` count this rank's; ``head_dim`` and ``vocab_size`` are the model's."""

    tensor_parallel_size: int = 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // (self.num_attention_heads * self.tensor_parallel_size)


def shard_config(cfg: Qwen2VLConfig, size: int) -> Qwen2VLConfig:
    """cfg with the decoder of one rank of ``size``; raises ConfigError when ``size`` does not
    divide the heads, the kv heads or the MLP width, naming them and the sizes that would."""
    t = cfg.text
    counts = {
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "intermediate_size": t.intermediate_size,
    }
    if size < 1 or any(n % size for n in counts.values()):
        bad = ", ".join(f"{k}={n}" for k, n in counts.items() if size < 1 or n % size)
        common = math.gcd(*counts.values())
        fits = [d for d in range(1, common + 1) if common % d == 0]
        raise ConfigError(
            f"tensor_parallel_size={size} does not divide {bad}; sizes that divide the heads, "
            f"kv heads and MLP width: {', '.join(map(str, fits))}",
            param="tensor_parallel_size",
        )
    whole = {f.name: getattr(t, f.name) for f in dataclasses.fields(TextConfig)}
    local = {k: n // size for k, n in counts.items()}
    text = ShardTextConfig(**{**whole, **local}, tensor_parallel_size=size)
    return dataclasses.replace(cfg, text=text)


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    dist.all_reduce(x, group=group)
    return x


class ShardedAttention(Attention):
    """Attention over this rank's heads; o_proj's partial sums added across ranks."""

    def __init__(self, cfg: ShardTextConfig, layer_idx: int, group: dist.ProcessGroup | None):
        super().__init__(cfg, layer_idx)
        self.group = group

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return _all_reduce(super().forward(*args, **kwargs), self.group)


class ShardedMLP(MLP):
    """The MLP over this rank's columns of the width; down_proj's partial sums added."""

    def __init__(self, cfg: ShardTextConfig, group: dist.ProcessGroup | None):
        super().__init__(cfg)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _all_reduce(super().forward(x), self.group)


class VocabShardEmbedding(nn.Embedding):
    """Rows [start, start + rows) of the token embedding; a token outside them embeds as zeros
    here, and the all-reduce adds the row from the rank that holds it."""

    def __init__(self, rows: int, dim: int, *, start: int, group: dist.ProcessGroup | None):
        super().__init__(rows, dim)
        self.start, self.group = start, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)  # [B, T, E]
        return _all_reduce(x.masked_fill(outside.unsqueeze(-1), 0), self.group)


class GatheredHead(nn.Module):
    """lm_head over this rank's vocabulary rows (``shard``, a Linear); every rank's logits
    gathered into the whole vocabulary."""

    def __init__(self, hidden: int, rows: int, vocab: int, *, size: int, group):
        super().__init__()
        self.shard = nn.Linear(hidden, rows, bias=False)
        self.vocab, self.size, self.group = vocab, size, group

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = self.shard(h).contiguous()  # [B, T, V/N]
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)[..., : self.vocab]  # [B, T, V]


def build_sharded(cfg: Qwen2VLConfig, shard: Shard) -> Qwen2VL:
    """Rank ``shard.rank``'s model on the meta device, before any weight is read."""
    local = shard_config(cfg, shard.size)
    t = local.text
    rows = shard.vocab_rows(t.vocab_size)
    with torch.device("meta"):
        model = Qwen2VL(local)
        for i, layer in enumerate(model.model.layers):
            layer.self_attn = ShardedAttention(t, i, shard.group)
            layer.mlp = ShardedMLP(t, shard.group)
        model.model.embed_tokens = VocabShardEmbedding(
            rows, t.hidden_size, start=shard.rank * rows, group=shard.group
        )
        model.lm_head = GatheredHead(
            t.hidden_size, rows, t.vocab_size, size=shard.size, group=shard.group
        )
    _tie(model)
    return model


def _tie(model: Qwen2VL) -> None:
    if model.cfg.text.tie_word_embeddings:  # both split by the same rows: the shards are tied
        model.lm_head.shard.weight = model.model.embed_tokens.weight


# ---- loading only this rank's slices ------------------------------------------------------------


def load_sharded(
    path: str | Path,
    dtype: str | torch.dtype | None,
    shard: Shard,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Qwen2VL:
    """Rank ``shard.rank``'s model from a checkpoint directory: each split tensor is read as
    its slice of the memory-mapped safetensors file (``get_slice``), whole ones whole. The keys
    and shapes are checked against the config first, as ``load_model`` checks them."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    cfg = Qwen2VLConfig.from_file(path / "config.json")
    dtype = resolve_dtype(dtype, cfg)
    where = _index(path)
    with torch.device("meta"):
        check_keys(Qwen2VL(cfg), {k: torch.empty(s) for k, (_, _, s) in where.items()})
    model = build_sharded(cfg, shard)
    wanted = [k for k in model.state_dict() if not (k == HEAD and cfg.text.tie_word_embeddings)]
    state: dict[str, torch.Tensor] = {}
    for file in sorted({where[_checkpoint_name(k)][0] for k in wanted}):
        with open_safetensors(file) as f:
            for k in wanted:
                name = _checkpoint_name(k)
                if where[name][0] == file:
                    t = _read_slice(f, where[name][1], name, where[name][2], shard)
                    state[k] = t.to(device=shard.device, dtype=dtype)
                    if progress is not None:
                        progress(len(state), len(wanted))
    model.load_state_dict(state, strict=False, assign=True)  # keys checked above; shapes here
    _tie(model)
    return model.eval()


def _checkpoint_name(key: str) -> str:
    return "lm_head.weight" if key == HEAD else key


def _index(path: Path) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Our key -> (file, key in the file, shape), read from the files' headers only."""
    out = {}
    for file in checkpoint_files(path):
        with open_safetensors(file) as f:
            for key in f.keys():
                out[canonical_key(key)] = (file, key, tuple(f.get_slice(key).get_shape()))
    return out


def split_dim(name: str) -> int | None:
    """The dimension of a checkpoint tensor (our key name) divided among ranks, or None."""
    if name in VOCAB_SPLITS:
        return 0
    if name.startswith("model.layers."):
        return LAYER_SPLITS.get(name.split(".", 3)[3])
    return None


def _read_slice(f, key: str, name: str, shape: tuple[int, ...], shard: Shard) -> torch.Tensor:
    """This rank's part of one tensor, read from the file's memory map."""
    dim = split_dim(name)
    if dim is None:
        return f.get_tensor(key)
    n = shape[dim]
    part = math.ceil(n / shard.size)
    lo, hi = min(n, shard.rank * part), min(n, (shard.rank + 1) * part)
    sl = f.get_slice(key)
    t = sl[lo:hi] if dim == 0 else sl[:, lo:hi]
    if hi - lo < part:  # the last vocabulary shard: zero rows up to the common size
        t = torch.cat([t, t.new_zeros(part - (hi - lo), *t.shape[1:])])
    return t


# ---- int8 --------------------------------------------------------------------------------------


def quantize_int8(model: Qwen2VL, *, kernels: Kernels = PYTORCH_ONLY) -> Qwen2VL:
    """``quantize.quantize_int8`` for a sharded model: rows of o_proj and down_proj are split
    across ranks, so each row's scale is its max over every rank (the scale TP 1 gives it);
    the other linears hold whole rows and quantise locally, lm_head's shard included."""
    group = model.model.embed_tokens.group
    for layer in model.model.layers:
        for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            setattr(parent, name, _int8_split_rows(getattr(parent, name), kernels, group))
    quantize_int8_whole(model, lm_head=False, kernels=kernels)
    model.lm_head.shard = Int8Linear(model.lm_head.shard, kernels)
    return model


def _int8_split_rows(linear: nn.Linear, kernels: Kernels, group) -> Int8Linear:
    """As quantize_per_channel, with max|w| of each row taken over every rank's columns."""
    amax = linear.weight.detach().float().abs().amax(dim=1)  # [N] of this rank's K/ranks
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return Int8Linear(linear, kernels, amax=amax)


# ---- memory ------------------------------------------------------------------------------------


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the tensors this process holds: ``llm`` (decoder, embedding, lm_head; a tied
    tensor once) and ``vision``."""
    out = {"llm": 0, "vision": 0}
    seen = set()
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
        if t.data_ptr() in seen or t.device.type == "meta":
            continue
        seen.add(t.data_ptr())
        out["vision" if name.startswith("visual.") else "llm"] += t.numel() * t.element_size()
    return out


def process_memory() -> dict[str, int]:
    """Bytes of this process's private memory now and its peak resident set (Linux), and on
    CUDA the allocator's current and peak bytes; empty where unknown."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("RssAnon", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.memory_allocated()
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


def log_memory(model: nn.Module, shard: Shard) -> None:
    held = weight_bytes(model)
    mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
    log.info(
        "tensor parallel rank %d of %d on %s: LLM weights %s (1/%d split), ViT %s (whole); %s",
        shard.rank,
        shard.size,
        shard.device,
        mib(held["llm"]),
        shard.size,
        mib(held["vision"]),
        ", ".join(f"{k} {mib(v)}" for k, v in process_memory().items()) or "process memory n/a",
    )
