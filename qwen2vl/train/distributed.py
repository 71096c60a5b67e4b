"""Process groups, DDP / FSDP2 wrapping and full state dicts, for torchrun or a single process.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; with WORLD_SIZE > 1 we join a process group (gloo
on CPU, NCCL on CUDA). Both wrappers average gradients over processes; the trainer scales its loss
by the world size so the update is that of the whole step's token-mean loss (see packing.py).

FSDP2 (`fully_shard`) shards each decoder layer and each vision block, then the root; on CPU it
runs over gloo. Full state dicts for saving are gathered to rank 0 only (cpu_offload).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> DistEnv:
    """Join torchrun's process group when there is one; pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(f"cuda:{local_rank}") if device == "cuda" else torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    return DistEnv(rank, world, local_rank, dev)


def teardown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, env: DistEnv, strategy: str) -> nn.Module:
    """DDP or FSDP2 around the model (unchanged in a single process)."""
    if not env.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in [*model.model.layers, *model.visual.blocks]:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    yield


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    if not env.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_any(mask: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """A bool tensor, true where it is true on any process."""
    if not env.distributed:
        return mask
    t = mask.to(device=env.device, dtype=torch.uint8)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.to(device=mask.device, dtype=torch.bool)


def average_grads(params: Iterable[torch.Tensor], env: DistEnv) -> None:
    """Averages the gradients of parameters outside the wrapped model over the ranks (what DDP
    does for the model's own). A missing gradient counts as zeros, with one process too: a rank
    without the loss this step still joins the collective, and the optimizer then steps the
    same whatever the process count."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        if env.distributed:
            dist.all_reduce(p.grad)
            p.grad /= env.world


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order. Pickled over the process group: only between the
    processes of this job, never from or to a file."""
    if not env.distributed:
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def to_float(x: torch.Tensor) -> float:
    """A scalar that may be an FSDP2 DTensor (e.g. a clipped gradient norm)."""
    if hasattr(x, "full_tensor"):
        x = x.full_tensor()
    return float(x)


def _options(env: DistEnv):
    # Imported here: torch.distributed.checkpoint takes a second to import.
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=env.distributed)


def full_model_state(model: nn.Module, env: DistEnv) -> dict[str, torch.Tensor]:
    """All weights under their plain names; the whole dict on rank 0, empty elsewhere.
    Every rank must call it (FSDP2 gathers)."""
    if not env.distributed:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(env))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv):
    """{"state": {name: {...}}, "param_groups": [...]} keyed by parameter names (rank 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(env))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state, env) -> None:
    """Restore a full (name-keyed) optimizer state on every rank."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options(env))
