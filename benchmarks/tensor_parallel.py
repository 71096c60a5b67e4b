"""Tensor parallelism measured on this machine, with the 2B architecture's shapes (bf16, CPU).

    torchrun --standalone --nproc-per-node 2 benchmarks/tensor_parallel.py [--layers 4]
    torchrun --standalone --nproc-per-node 1 benchmarks/tensor_parallel.py [--layers 4]   (TP 1)

Prints, from each rank: the memory its loaded shard takes (tensor bytes, private RSS) and the
decode time per token; from rank 0, with 2 ranks: the choices tensor_parallel.py makes against
their alternatives (DTensor's ColwiseParallel/RowwiseParallel against plain collectives for the
MLP; embedding and lm_head split against replicated; the ViT on every rank against rank 0 plus a
broadcast of its features). Asserts nothing.
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from qwen2vl.bench import random_checkpoint
from qwen2vl.generation import tensor_parallel
from qwen2vl.generation.compute import choose_kernels, cpu_matmuls
from qwen2vl.generation.generate import Generator
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.model.text import MLP
from qwen2vl.presets import preset

MiB = 2**20


def median_ms(fn, n: int = 50, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        dist.barrier() if dist.is_initialized() else None
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def say(*parts) -> None:
    print(f"[rank {int(os.environ.get('RANK', 0))}]", *parts, flush=True)


def measure_model(path: Path, tp: int):
    before = tensor_parallel.process_memory().get("RssAnon", 0)
    model = load_for_inference(path, "bfloat16", tensor_parallel_size=tp)
    after = tensor_parallel.process_memory()
    held = tensor_parallel.weight_bytes(model)
    say(
        f"TP {tp}: LLM tensors {held['llm'] / MiB:.0f} MiB, ViT {held['vision'] / MiB:.0f} MiB;"
        f" private RSS grew {(after.get('RssAnon', 0) - before) / MiB:.0f} MiB,"
        f" peak RSS {after.get('VmHWM', 0) / MiB:.0f} MiB"
    )
    ids = torch.arange(32)[None] + 1000
    params = SamplingParams(max_new_tokens=33)
    gen = Generator.start(model, {"input_ids": ids}, params, stop_token_ids=[])
    gen.step()
    t = time.perf_counter()
    n = sum(1 for _ in gen)
    rss = Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]
    say(
        f"TP {tp}: decode {1000 * (time.perf_counter() - t) / n:.1f} ms/token (B=1); "
        f"resident after decoding (weights are memory-mapped: touched pages) {int(rss) // 1024} MiB"
    )
    return model


def mlp_dtensor_vs_plain(group_size: int) -> None:
    """One decode row through the 2B MLP: DTensor parallelize_module vs ShardedMLP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    cfg = preset("2B").text
    torch.manual_seed(0)
    full = MLP(cfg).to(torch.bfloat16)
    mesh = init_device_mesh("cpu", (group_size,))
    plan = {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel()}
    dt = parallelize_module(full, mesh, {**plan, "down_proj": RowwiseParallel()})
    local = tensor_parallel.ShardedMLP(
        tensor_parallel.shard_config(preset("2B"), group_size).text, None
    ).to(torch.bfloat16)
    x = torch.randn(1, 1, cfg.hidden_size, dtype=torch.bfloat16)
    with torch.inference_mode():
        t_dt = median_ms(lambda: dt(x))
        t_plain = median_ms(lambda: local(x))
        fast = cpu_matmuls(local, choose_kernels(torch.bfloat16))
        t_fast = median_ms(lambda: fast(x))
    say(
        f"2B MLP, one decode row: DTensor Colwise/Rowwise {t_dt:.2f} ms, plain shards + "
        f"all_reduce {t_plain:.2f} ms (F.linear), {t_fast:.2f} ms (with the decode kernel)"
    )


def vocab_split_vs_replicated(size: int, rank: int) -> None:
    """lm_head and embedding of 2B for one decode row: whole on each rank vs split + collective."""
    V, E = 151936, 1536
    rows = -(-V // size)
    head_full = torch.randn(V, E, dtype=torch.bfloat16)
    head_part = head_full[rank * rows : (rank + 1) * rows].contiguous()
    h = torch.randn(1, 1, E, dtype=torch.bfloat16)

    def split_head():
        local = F.linear(h, head_part)
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local)
        return torch.cat(parts, -1)

    embed = tensor_parallel.VocabShardEmbedding(rows, E, start=rank * rows, group=None)
    embed = embed.to(torch.bfloat16)
    ids = torch.tensor([[1000]])
    with torch.inference_mode():
        t_full = median_ms(lambda: F.linear(h, head_full))
        t_split = median_ms(split_head)
        e_full = median_ms(lambda: F.embedding(ids, head_full))
        e_split = median_ms(lambda: embed(ids))
    say(
        f"2B lm_head, one row: replicated {t_full:.2f} ms ({V * E * 2 / MiB:.0f} MiB a rank), "
        f"split + all_gather {t_split:.2f} ms ({rows * E * 2 / MiB:.0f} MiB); embedding lookup: "
        f"replicated {e_full:.3f} ms, split + all_reduce {e_split:.3f} ms"
    )


def vit_vs_broadcast(model) -> None:
    """Encoding one 448x448 image with the whole ViT vs broadcasting its features from rank 0."""
    patches, grid = torch.randn(32 * 32, 1176, dtype=torch.bfloat16), torch.tensor([[1, 32, 32]])
    with torch.inference_mode():
        t_vit = median_ms(lambda: model.encode_visual(patches, grid), n=1, warmup=0)
        feats = model.encode_visual(patches, grid)
    t_bcast = median_ms(lambda: dist.broadcast(feats, 0), n=20)
    say(
        f"ViT, one 448x448 image (256 features): encode {t_vit:.0f} ms on each rank; "
        f"broadcasting the features from rank 0 {t_bcast:.2f} ms "
        f"({feats.numel() * 2 / MiB:.2f} MiB)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4, help="LLM layers of the 2B-shaped model")
    args = p.parse_args()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    with tempfile.TemporaryDirectory(prefix="qwen2vl-tp-") as tmp:
        path = Path(tmp) / "model"
        if int(os.environ.get("RANK", "0")) == 0:
            random_checkpoint("2B", Path(tmp), layers=args.layers)
        if size > 1:
            dist.init_process_group("gloo")
            dist.barrier()
            shared = [path]
            dist.broadcast_object_list(shared, 0)
            path = shared[0]
        model = measure_model(path, size)
        if size > 1:
            rank = dist.get_rank()
            mlp_dtensor_vs_plain(size)
            vocab_split_vs_replicated(size, rank)
            vit_vs_broadcast(model)
            dist.barrier()


if __name__ == "__main__":
    main()
