"""`qwen2vl serve` as users start it: a real process on a loopback port, stopped with SIGTERM."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

import pytest
import torch
from loading import Loading, stop_at_load

from qwen2vl.cli import main, parser
from qwen2vl.serve.cli import _limits, build_app

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


def test_device_and_dtype_default_to_auto():
    args = parser().parse_args(["serve"])
    assert (args.device, args.dtype) == ("auto", "auto")


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_its_extra_says_what_to_install(
    missing, ckpt, no_weights, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, missing, None)  # any import of it now fails
    assert main(["serve", "--model", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err == 'error: qwen2vl serve needs fastapi and uvicorn: pip install "qwen2vl[serve]"\n'


@pytest.mark.parametrize(
    "option", ["--max-num-seqs=0", "--max-queue=-1", "--prefill-chunk=x", "--max-model-len=0",
               "--port=70000", "--request-timeout=0", "--max-body-mb=nan",
               "--encoder-cache-items=-1", "--dtype=half"],
)  # fmt: skip
def test_serve_refuses_bad_values_before_reading_weights(option, ckpt, no_weights, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["serve", "--model", str(ckpt), option])
    assert exit.value.code == 2
    assert f"argument {option.split('=')[0]}:" in capsys.readouterr().err


def test_serve_refuses_a_missing_gpu_before_reading_weights(ckpt, no_weights, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["serve", "--model", str(ckpt), "--device", "cuda:1"]) == 2
    assert capsys.readouterr().err == "error: --device cuda:1: no CUDA device is available\n"


def test_serve_loads_on_the_resolved_device_and_dtype(ckpt, monkeypatch):
    # a simulated Ampere GPU: the loader is asked for cuda:0 in bfloat16 (and stops there)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    asked = stop_at_load(monkeypatch, "qwen2vl.generation.load.load_for_inference")
    with pytest.raises(Loading):
        build_app(parser().parse_args(["serve", "--model", str(ckpt)]))
    assert asked == {"dtype": torch.bfloat16, "device": torch.device("cuda:0")}


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
