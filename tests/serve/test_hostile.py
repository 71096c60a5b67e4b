"""Hostile requests against a real `qwen2vl serve` process: no local file is read without
permission, one request never fails another, cost is checked before it is paid (peak RSS of the
server process), and every mistake is one typed 400. The server must come through the whole
module with no 5xx, no traceback in its log, one log line per request and the same answer to a
normal request at the end as at the start."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
try:  # the openai client brings httpx2 (openai 3.x) or httpx (earlier)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

MB = 1024 * 1024
NORMAL = {"messages": [{"role": "user", "content": "Say something."}], "max_tokens": 12, "seed": 1}


class Process:
    """`python -m qwen2vl serve` on a free port, its log in a file; every response's status
    is kept so the module can check that none was a 5xx."""

    def __init__(self, ckpt: Path, port: int, log: Path, *extra: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        args = ["--model", str(ckpt), "--dtype", "float32", "--port", str(port),
                "--max-model-len", "1024", "--max-num-seqs", "4", "--log-level", "info",
                "--served-model-name", "m", *extra]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen2vl", "serve", *args],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.statuses: list[int] = []
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + log.read_text())
            time.sleep(0.1)

    def post(self, body: dict | bytes, path: str = "/v1/chat/completions", **kw) -> httpx.Response:
        if isinstance(body, dict):
            body = json.dumps({"model": "m", **body}).encode()
        r = httpx.post(self.url + path, content=body, timeout=60,
                       headers={"content-type": "application/json"}, **kw)  # fmt: skip
        self.statuses.append(r.status_code)
        return r

    def peak_rss(self) -> int:
        """The process's high-water mark of resident memory, in bytes."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def reset_peak(self) -> None:
        """Start a new high-water mark (Linux: writing 5 to clear_refs resets VmHWM)."""
        Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


@pytest.fixture(scope="module")
def hostile(ckpt, tmp_path_factory, free_port):
    log = tmp_path_factory.mktemp("hostile") / "server.log"
    server = Process(ckpt, free_port(), log, "--max-tokens-default", "16", "--max-body-mb", "40")
    first = server.post(NORMAL)
    assert first.status_code == 200, first.text
    server.first_answer = first.json()["choices"][0]["message"]["content"]
    yield server
    server.stop()


def content(*parts) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}],
            "max_tokens": 2}  # fmt: skip


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


# ---- security: one resolver, one policy ----------------------------------------------------


def local_forms(path: str) -> list[dict]:
    """Every way a content part can name a media source, all pointing at `path`."""
    return [
        {"type": "image_url", "image_url": {"url": path}},
        {"type": "image_url", "image_url": path},
        {"type": "image_url", "image_url": {"url": Path(path).as_uri()}},
        {"type": "image", "image": path},
        {"type": "image", "image": {"url": path}},
        {"image": path},
        {"image": {"url": path}},
        {"type": "video_url", "video_url": {"url": path}},
        {"type": "video", "video": path},
        {"type": "video", "video": {"url": path}},
        {"type": "video", "video": [path, path]},
        {"video": [path]},
    ]


def test_no_local_file_is_read_without_permission(hostile, ckpt, tmp_path):
    real = tmp_path / "secret.png"
    Image.new("RGB", (40, 40)).save(real)
    missing = tmp_path / "missing.png"
    messages = {}
    for path in (str(real), str(missing), str(ckpt / "config.json")):
        for part in local_forms(path):
            err = error_of(hostile.post(content(part)))
            assert err["code"] == "local_media_refused", (part, err)
            assert "--allowed-local-media-path" in err["message"]
            messages.setdefault(json.dumps(part).replace(path, "P"), set()).add(
                err["message"].replace(path, "P")
            )
    # an existing file, a missing one and a non-image are refused in the same words
    assert all(len(texts) == 1 for texts in messages.values()), messages


def test_remote_media_refusal_names_the_server_flag(hostile):
    err = error_of(
        hostile.post(content({"type": "image_url", "image_url": "http://127.0.0.1:9/x"}))
    )
    assert err["code"] == "remote_media_refused" and "--allow-remote-media" in err["message"]
    assert "allow_remote=True" not in err["message"]


def test_every_route_but_health_and_the_page_needs_the_key(ckpt, start_server):
    with start_server(ckpt, "--api-key", "sekret") as server:
        for path in ("/metrics", "/docs", "/openapi.json", "/redoc", "/v1/models", "/v1/x"):
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                r = httpx.get(server.url + path, headers=headers)
                assert r.status_code == 401, (path, r.status_code)
        r = httpx.post(server.url + "/v1/chat/completions", content=b"{}")
        assert r.status_code == 401
        key = {"Authorization": "Bearer sekret"}
        for path in ("/metrics", "/openapi.json", "/v1/models"):
            assert httpx.get(server.url + path, headers=key).status_code == 200
        for path in ("/health", "/", "/static/app.js"):
            assert httpx.get(server.url + path).status_code in (200, 404)
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/").status_code == 200


# ---- one request never fails another ----------------------------------------------------------


def stream_text(server: Process, body: dict) -> str:
    """A streamed completion's text (and its status recorded)."""
    text = []
    payload = json.dumps({"model": "m", "stream": True, **body}).encode()
    with httpx.stream("POST", server.url + "/v1/chat/completions", content=payload, timeout=60,
                      headers={"content-type": "application/json"}) as r:  # fmt: skip
        server.statuses.append(r.status_code)
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                for choice in chunk["choices"]:
                    text.append(choice["delta"].get("content") or "")
    return "".join(text)


def test_poisoned_requests_beside_healthy_streams(hostile):
    healthy = [
        {"messages": [{"role": "user", "content": f"Count to {n}."}], "max_tokens": 24, **extra}
        for n, extra in ((3, {"temperature": 0}), (5, {"temperature": 0}), (7, {"seed": 7}))
    ]
    alone = [stream_text(hostile, body) for body in healthy]
    poisons = [
        ({"temperature": 1e-300}, 200),  # greedy
        ({"temperature": 5e-324, "top_p": 1e-300}, 200),
        ({"repetition_penalty": 1e300}, 400),
        ({"repetition_penalty": 1e-300}, 400),
        ({"seed": 2**64}, 400),
        ({"seed": -1}, 400),
    ]
    together: list = [None] * len(healthy)
    results: list = []

    def run_healthy(i):
        together[i] = stream_text(hostile, healthy[i])

    def run_poison(extra, status):
        r = hostile.post({"messages": [{"role": "user", "content": "x"}], "max_tokens": 24,
                          **extra})  # fmt: skip
        results.append((extra, status, r))

    threads = [threading.Thread(target=run_healthy, args=(i,)) for i in range(len(healthy))]
    threads += [threading.Thread(target=run_poison, args=p) for p in poisons]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    for extra, status, r in results:
        assert r.status_code == status, (extra, r.text)
        if status == 400:
            param = error_of(r)["param"]
            assert param == next(iter(extra)), (extra, r.text)
            assert error_of(r)["code"] != "context_length_exceeded"


# ---- memory: cost is checked before it is paid -------------------------------------------------


def png_16bit(side: int) -> bytes:
    """A grayscale 16-bit PNG of side x side black pixels, written row by row (a few hundred KB
    for 8192 x 8192)."""
    head = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    packer = zlib.compressobj(9)
    row = b"\0" * (1 + 2 * side)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def gif_with_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height, holding one 1 x 1 frame (about 40 bytes)."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    return screen + frame + b"\x3b"


def assert_cheap(server: Process, body: dict | bytes, *, code: str, rss_mb: float, seconds: float):
    server.reset_peak()
    before = server.peak_rss()
    start = time.monotonic()
    err = error_of(server.post(body))
    took = time.monotonic() - start
    grew = (server.peak_rss() - before) / MB
    assert err["code"] == code, err
    assert grew < rss_mb, f"peak RSS grew by {grew:.0f} MB"
    assert took < seconds, f"took {took:.1f} s"
    return err


def test_a_tiny_image_with_huge_min_pixels_is_refused_before_decoding(hostile):
    tiny = png(Image.new("RGB", (1, 1)))
    assert len(tiny) < 100
    part = {"type": "image_url", "image_url": {"url": uri(tiny)}, "min_pixels": 10**12}
    err = assert_cheap(hostile, content(part), code="context_length_exceeded", rss_mb=50, seconds=5)
    assert err["param"] == "messages"
    for key, value in (("max_pixels", 10**12), ("total_pixels", 10**15), ("max_frames", 10**9)):
        # pixel and frame keys are clamped to the server's maxima: the frame fits, cheaply
        hostile.reset_peak()
        before = hostile.peak_rss()
        body = content({"type": "video", "video": [uri(tiny)] * 2, key: value, "fps": 1e9})
        r = hostile.post(body)
        assert r.status_code == 200, r.text
        assert hostile.peak_rss() - before < 50 * MB


def test_a_16_bit_png_of_8192_squared_is_refused_from_its_header(hostile):
    data = png_16bit(8192)
    assert len(data) < 400_000
    part = {"type": "image_url", "image_url": {"url": uri(data)}}
    err = assert_cheap(hostile, content(part), code="image_too_large", rss_mb=40, seconds=5)
    assert "8192x8192" in err["message"]


def test_a_tiny_gif_with_a_huge_screen_is_refused_as_a_video(hostile):
    pytest.importorskip("av")
    data = gif_with_screen(6000, 6000)
    assert len(data) < 140
    part = {"type": "video_url", "video_url": {"url": uri(data, "image/gif")}}
    assert_cheap(hostile, content(part), code="image_too_large", rss_mb=40, seconds=5)


def test_a_million_empty_messages_fail_fast(hostile):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": ""}] * 1_000_000})
    assert len(body) > 25 * MB
    err = assert_cheap(hostile, body.encode(), code="too_many_messages", rss_mb=400, seconds=8)
    assert err["param"] == "messages"


def test_structural_limits(hostile):
    many_parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 100}]}
    assert error_of(hostile.post(many_parts))["code"] == "too_many_parts"
    text = {"messages": [{"role": "user", "content": "a" * 3_000_000}]}
    assert error_of(hostile.post(text))["code"] == "context_length_exceeded"
    deep = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert error_of(hostile.post(deep))["message"]
    nested = {"messages": [{"role": "user", "content": "x"}], "tools": [{"a": {}}]}
    node: dict = nested["tools"][0]["a"]
    for _ in range(40):
        node["a"] = {}
        node = node["a"]
    assert error_of(hostile.post(nested))["message"]


def test_omitted_max_tokens_takes_the_server_default(hostile):
    r = hostile.post({"messages": [{"role": "user", "content": "Go on."}], "ignore_eos": True})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 16  # --max-tokens-default 16


# ---- errors: typed, 400, once --------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value",
    [("min_pixels", "abc"), ("max_pixels", 1.5), ("fps", "x"), ("nframes", "3"),
     ("resized_height", [1]), ("video_start", -1), ("total_pixels", True), ("fps", 0)],
)  # fmt: skip
def test_wrongly_typed_media_keys_name_their_param(hostile, key, value):
    frames = [uri(png(Image.new("RGB", (28, 28))))] * 2
    for part in ({"type": "video", "video": frames, key: value},
                 {"type": "video_url", "video_url": {"url": frames[0], key: value}}):  # fmt: skip
        err = error_of(hostile.post(content(part)))
        assert err["type"] == "invalid_request_error"
        assert err["param"] == f"messages[0].content[0].{key}", err


def test_a_lone_surrogate_in_a_path_is_400(hostile):
    body = b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", ' \
        b'"image_url": {"url": "/tmp/\\udcff.png"}}]}]}'  # fmt: skip
    err = error_of(hostile.post(body))
    assert err["param"] == "messages[0].content[0].image_url.url"
    assert "not valid Unicode" in err["message"]


def test_schema_errors_are_400_with_their_param(hostile):
    cases = (({"temperature": 5}, "temperature"), ({"n": 0}, "n"),
             ({"max_tokens": 0}, "max_tokens"), ({"messages": []}, "messages"))  # fmt: skip
    for extra, param in cases:
        body = {"messages": [{"role": "user", "content": "hi"}], **extra}
        err = error_of(hostile.post(body))
        assert err["param"] == param and err["code"] == "invalid_schema", err


def test_a_truncated_png_is_refused(hostile):
    whole = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 64, 3), np.uint8)))
    cut = whole[: len(whole) // 10]
    err = error_of(hostile.post(content({"type": "image_url", "image_url": {"url": uri(cut)}})))
    assert err["param"] == "messages"


# ---- the server after all of it ------------------------------------------------------------------


def test_the_server_came_through(hostile):
    again = hostile.post(NORMAL)
    assert again.status_code == 200
    assert again.json()["choices"][0]["message"]["content"] == hostile.first_answer
    assert not [s for s in hostile.statuses if s >= 500], hostile.statuses
    log = hostile.log.read_text()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    requests = log.count('"POST /v1/chat/completions HTTP/1.1"')
    assert requests == len(hostile.statuses), (requests, len(hostile.statuses))
