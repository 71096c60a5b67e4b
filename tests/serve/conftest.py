"""A real server on a free loopback port (uvicorn in a thread) over a tiny real-vocabulary model."""

from __future__ import annotations

import argparse
import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_qwen2vl import tiny_real_vocab_checkpoint

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from qwen2vl.serve.cli import add_arguments, build_app  # noqa: E402


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    return tiny_real_vocab_checkpoint(tmp_path_factory.mktemp("tiny-serve"))


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory) -> Path:
    """The --allowed-local-media-path of the test servers, with one picture in it."""
    root = tmp_path_factory.mktemp("media")
    picture(seed=0).save(root / "picture.png")
    return root


def picture(seed: int = 0, size: tuple[int, int] = (90, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app, port: int):
        self.app, self.port = app, port
        self.url = f"http://127.0.0.1:{port}"
        self.engine = app.state.engine
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)

    def client(self, **kwargs):
        import openai

        kwargs.setdefault("api_key", "unused")
        return openai.OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=60, **kwargs)


@contextmanager
def running_server(ckpt: Path, *extra: str) -> Iterator[Server]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    port = free_port()
    args = parser.parse_args(
        ["--model", str(ckpt), "--dtype", "float32", "--port", str(port), "--log-level",
         "warning", "--max-model-len", "1024", *extra]
    )  # fmt: skip
    server = Server(build_app(args), port)
    server.thread.start()
    deadline = time.monotonic() + 30
    while not server.uvicorn.started:
        if time.monotonic() > deadline or not server.thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.uvicorn.should_exit = True
        server.thread.join(15)


@pytest.fixture(scope="session", name="free_port")
def free_port_fixture():
    """free_port(): a loopback port nobody listens on."""
    return free_port


@pytest.fixture(scope="session")
def start_server():
    """running_server(ckpt, *cli_args): a context manager for a server of one's own."""
    return running_server


@pytest.fixture(scope="session")
def server(ckpt, media_dir) -> Iterator[Server]:
    """The shared server: 4 slots, local media under media_dir, a 2 MB body limit."""
    with running_server(
        ckpt, "--max-num-seqs", "4", "--allowed-local-media-path", str(media_dir),
        "--max-body-mb", "2", "--limit-mm-per-prompt", "image=2,video=1", "--prefill-chunk", "64",
    ) as s:  # fmt: skip
        yield s


class Helpers:
    """Plain helpers for the test modules (conftest is not importable by name here)."""

    picture = staticmethod(picture)
    data_uri = staticmethod(data_uri)

    @staticmethod
    def wait_idle(engine, timeout: float = 10.0) -> dict:
        return wait_idle(engine, timeout)


@pytest.fixture(scope="session")
def helpers() -> type[Helpers]:
    return Helpers


def wait_idle(engine, timeout: float = 10.0) -> dict:
    """Engine stats once nothing is waiting or running (a slot leak fails here)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        idle = stats["waiting"] == 0 and stats["running"] == 0
        if idle and stats["free_slots"] == engine.config.max_num_seqs:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"engine not idle: {stats}")
        time.sleep(0.02)
