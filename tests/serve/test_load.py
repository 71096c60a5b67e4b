"""Loopback load: many concurrent streams, some clients leaving mid-stream; no slot may leak.
The benchmark (slow; run with -s to see the figures) compares aggregate decode throughput of
8 concurrent streams with 1 stream on the same server: a figure, never an assertion."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
try:  # the openai client brings httpx2 (openai 3.x) or httpx (earlier)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def stream_one(client, model, i: int, *, tokens: int, leave_after: int | None) -> dict:
    """One streaming chat; with leave_after, the client hangs up after that many chunks."""
    start = time.monotonic()
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": f"Story number {i}, please."}],
        max_tokens=tokens, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    text, chunks, first, reason = "", 0, None, None
    for chunk in stream:
        if not chunk.choices:
            continue
        chunks += 1
        delta = chunk.choices[0].delta.content or ""
        if delta and first is None:
            first = time.monotonic() - start
        text += delta
        reason = chunk.choices[0].finish_reason or reason
        if leave_after is not None and chunks >= leave_after:
            stream.close()  # the connection goes; the server must cancel the sequence
            break
    return {"text": text, "reason": reason, "ttft": first, "seconds": time.monotonic() - start}


def test_32_streams_with_a_quarter_leaving_mid_stream(ckpt, start_server):
    with start_server(ckpt, "--max-num-seqs", "8", "--max-queue", "64") as server:
        client = server.client()
        model = client.models.list().data[0].id
        leavers = set(range(0, 32, 4))
        with ThreadPoolExecutor(32) as pool:
            futures = [
                pool.submit(stream_one, client, model, i, tokens=200 if i in leavers else 16,
                            leave_after=3 if i in leavers else None)
                for i in range(32)
            ]  # fmt: skip
            results = [f.result(timeout=120) for f in futures]
        for i, r in enumerate(results):
            if i not in leavers:
                assert r["reason"] == "length" and r["text"], (i, r)
        stats = server.engine.stats()
        deadline = time.monotonic() + 15
        while (stats["running"] or stats["waiting"]) and time.monotonic() < deadline:
            time.sleep(0.05)
            stats = server.engine.stats()
        text = httpx.get(server.url + "/metrics").text
        assert metric(text, "qwen2vl_queue_length") == 0
        assert metric(text, "qwen2vl_running_sequences") == 0
        assert metric(text, "qwen2vl_free_slots") == 8
        assert metric(text, 'qwen2vl_requests_total{outcome="cancelled"}') == len(leavers)
        assert metric(text, 'qwen2vl_requests_total{outcome="length"}') == 32 - len(leavers)
        assert metric(text, "qwen2vl_time_to_first_token_seconds_count") == 32


def throughput(client, model, streams: int, tokens: int) -> dict:
    """Aggregate generated tokens per second of `streams` concurrent streams (and client TTFT)."""
    barrier = threading.Barrier(streams)

    def one(i: int) -> dict:
        barrier.wait()
        return stream_one(client, model, i, tokens=tokens, leave_after=None)

    start = time.monotonic()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(one, range(streams)))
    wall = time.monotonic() - start
    ttfts = sorted(r["ttft"] for r in results)
    return {"tokens_per_s": streams * tokens / wall, "ttft_median_s": ttfts[len(ttfts) // 2]}


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_benchmark_8_streams_vs_1(size, checkpoints, start_server):
    path = checkpoints(size)
    with start_server(path, "--max-num-seqs", "8") as server:
        client = server.client()
        model = client.models.list().data[0].id
        throughput(client, model, 2, 8)  # warm-up
        one = throughput(client, model, 1, 64)
        eight = throughput(client, model, 8, 64)
    ratio = eight["tokens_per_s"] / one["tokens_per_s"]
    print(
        f"\n[{size}] 1 stream: {one['tokens_per_s']:.1f} tok/s (TTFT {one['ttft_median_s']:.3f} s)"
        f" | 8 streams: {eight['tokens_per_s']:.1f} tok/s aggregate "
        f"(median TTFT {eight['ttft_median_s']:.3f} s) | ratio {ratio:.2f}x"
    )


@pytest.mark.slow
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_benchmark_engine_8_vs_1(size, checkpoints):
    """The engine alone (no HTTP), on one torch thread: steadier than the server figure on a
    shared machine, and it shows what the scheduler itself costs."""
    import torch

    from qwen2vl.generation.pipeline import Pipeline
    from qwen2vl.generation.sampling import SamplingParams
    from qwen2vl.serve.engine import Engine, EngineConfig
    from qwen2vl.serve.sequence import Finish, Request

    pipe = Pipeline.from_pretrained(checkpoints(size), dtype="float32")
    engine = Engine(pipe.model, pipe.processor, EngineConfig(max_num_seqs=8, max_model_len=512))
    ids = pipe.processor.encode([{"role": "user", "content": "A story, please."}]).ids
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rates = {}
        for streams in (1, 8, 1, 8):  # the first round warms up
            done = []
            for _ in range(streams):
                req = Request(ids, params=SamplingParams(max_new_tokens=64), ignore_eos=True)
                engine.submit(req, lambda e, done=done: isinstance(e, Finish) and done.append(e))
            start = time.monotonic()
            while len(done) < streams:
                engine.step()
            rates[streams] = streams * 64 / (time.monotonic() - start)
    finally:
        torch.set_num_threads(threads)
    print(f"\n[{size}, engine only, 1 thread] 1 stream: {rates[1]:.1f} tok/s | 8 streams: "
          f"{rates[8]:.1f} tok/s | ratio {rates[8] / rates[1]:.2f}x")  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(ckpt, tmp_path_factory):
    """Benchmark models by size; "small" is built on first use."""
    paths = {"tiny": ckpt}

    def get(size: str):
        if size not in paths:
            paths[size] = small_checkpoint(tmp_path_factory.mktemp(size))
        return paths[size]

    return get


def small_checkpoint(path):
    """A random 0.1B-parameter model (real vocabulary, 8 layers of width 512): big enough that
    decode time goes to matrix products rather than to Python, as with real checkpoints."""
    import torch

    import qwen2vl
    from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig

    text = TextConfig(
        vocab_size=151936, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=2, mrope_section=[8, 12, 12],
    )  # fmt: skip
    vision = VisionConfig(depth=2, embed_dim=64, num_heads=2, hidden_size=512)
    torch.manual_seed(0)
    model = qwen2vl.Qwen2VL(Qwen2VLConfig(text=text, vision=vision, torch_dtype="float32"))
    qwen2vl.save_pretrained(model.eval(), path)
    return path
