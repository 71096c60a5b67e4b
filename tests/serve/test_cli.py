"""`qwen2vl serve` as users start it: a real process on a loopback port, stopped with SIGTERM."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import pytest

from qwen2vl.cli import parser
from qwen2vl.serve.cli import _limits

try:  # the openai client brings httpx2 (openai 3.x) or httpx (earlier)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")


def test_limit_mm_per_prompt_parses_both_spellings():
    assert _limits("image=3,video=0") == {"image": 3, "video": 0}
    assert _limits('{"image": 1}') == {"image": 1, "video": 2}
    for bad in ("image=x", "audio=1", "image=-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _limits(bad)


def test_the_main_parser_wires_a_serve_command():
    args = parser().parse_args(["serve", "--model", "m", "--limit-mm-per-prompt", "image=1"])
    assert args.command == "serve" and callable(args.run) and args.port == 8000
    assert args.limit_mm_per_prompt == {"image": 1, "video": 2} and args.host == "127.0.0.1"


def test_serve_process_answers_and_stops_cleanly(ckpt, free_port):
    port = free_port()
    cmd = [sys.executable, "-m", "qwen2vl", "serve", "--model", str(ckpt), "--dtype", "float32",
           "--port", str(port), "--max-model-len", "512", "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.1)
        body = {"model": ckpt.name, "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3}  # fmt: skip
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit status -15)
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in out, out
