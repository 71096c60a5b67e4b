"""The server measured through HTTP: aggregate decode tokens/s of 1, 4 and 8 concurrent streams,
and time to first token of a repeated system prompt + image with and without the prefix cache.

    .venv/bin/python benchmarks/serve_throughput.py [--model DIR | --preset 2B] [--layers N]
        [--new-tokens 32] [--streams 1,4,8] [--image-size 448] [--quantize int8|int4]

Without --model it writes a random bf16 checkpoint of the preset's architecture. The real server
(``qwen2vl serve``'s app and engine, uvicorn on a loopback port) runs in this process; clients
are threads with the openai client. Each concurrency level sends that many greedy requests at
once with ``ignore_eos`` and ``max_tokens`` = --new-tokens, so every stream decodes the same
number of tokens; the aggregate rate is the sum of each stream's tokens/s from its first token to
its last, after one warm-up round. TTFT: a request with a ~300-token system prompt, a
--image-size image and a question, sent twice (and a third time with a different question) on a
server with the prefix cache, and on one without it (the encoder cache still spares the ViT
there). Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import base64
import io
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openai
import uvicorn
from PIL import Image

from qwen2vl.bench import random_checkpoint
from qwen2vl.presets import PRESETS
from qwen2vl.serve.cli import add_arguments, build_app


@contextmanager
def server(model: Path, *extra: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", str(model), "--port", "0", "--log-level", "warning",
                              "--max-model-len", "2048", *extra])  # fmt: skip
    app = build_app(args)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", timeout=3600)
    try:
        yield client, model.name
    finally:
        srv.should_exit = True
        thread.join(30)


def stream_times(client, model: str, text: str, new_tokens: int) -> tuple[float, float, int]:
    """(first token time, end time, tokens) of one streamed greedy request."""
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], max_tokens=new_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first, time.perf_counter(), tokens


def aggregate_rate(client, model: str, streams: int, new_tokens: int) -> float:
    """Decode tokens/s of ``streams`` requests sent at once: the sum of each stream's rate from
    its first token to its last (short prompts: all are admitted in one scheduler step, so the
    streams decode together)."""
    texts = [f"Request {i}: tell me a long story about the number {i}." for i in range(streams)]
    with ThreadPoolExecutor(streams) as pool:
        runs = list(pool.map(lambda t: stream_times(client, model, t, new_tokens), texts))
    assert all(n == new_tokens for _, _, n in runs), [n for _, _, n in runs]
    return sum((n - 1) / (last - first) for first, last, n in runs)


def picture(size: int) -> str:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def ttft(client, model: str, image: str, question: str) -> tuple[float, int]:
    system = "You are a meticulous visual assistant. " * 40  # ~300 tokens
    messages = [
        {"role": "system", "content": system},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                     {"type": "text", "text": question}]},
    ]  # fmt: skip
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=2, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    first, cached = None, 0
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return first, cached


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path)
    p.add_argument("--preset", default="2B", choices=sorted(PRESETS))
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--streams", default="1,4,8")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None)
    args = p.parse_args()
    levels = [int(s) for s in args.streams.split(",")]
    extra = ["--max-num-seqs", str(max(levels))]
    if args.quantize:
        extra += ["--quantize", args.quantize]
    with tempfile.TemporaryDirectory(prefix="qwen2vl-serve-bench-") as tmp:
        model = args.model or random_checkpoint(args.preset, Path(tmp), args.layers)
        image = picture(args.image_size)
        with server(model, *extra) as (client, name):
            aggregate_rate(client, name, 1, 4)  # warm-up
            rates = {n: aggregate_rate(client, name, n, args.new_tokens) for n in levels}
            base = rates[levels[0]]
            print(f"decode, {args.new_tokens} tokens a stream, greedy ({args.quantize or 'bf16'}):")
            for n, rate in rates.items():
                print(
                    f"  {n} streams: {rate:7.2f} tok/s aggregate  ({rate / base:.2f}x {levels[0]})"
                )
            with_cache = [ttft(client, name, image, q) for q in ("What is this?", "What is this?",
                                                                 "Describe it.")]  # fmt: skip
        with server(model, *extra, "--prefix-cache-mb", "0") as (client, name):
            without = [ttft(client, name, image, q) for q in ("What is this?", "What is this?")]
    print("time to first token, system prompt + image + question:")
    print(f"  first request            {with_cache[0][0] * 1e3:8.0f} ms")
    for label, (t, cached) in (("same again", with_cache[1]), ("other question", with_cache[2])):
        print(f"  {label:<24} {t * 1e3:8.0f} ms  ({cached} tokens cached; "
              f"{with_cache[0][0] / t:.1f}x shorter)")  # fmt: skip
    print(
        f"  same again, no prefix cache {without[1][0] * 1e3:5.0f} ms  (encoder cache only; "
        f"{without[0][0] / without[1][0]:.1f}x shorter)"
    )


if __name__ == "__main__":
    main()
