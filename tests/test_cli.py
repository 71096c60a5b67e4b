"""The command line, run as a real process; and in-process (main) where a test asserts what is
refused before any weights are read."""

import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest
import torch
from loading import Loading, stop_at_load
from PIL import Image
from tiny_qwen2vl import tiny_real_vocab_checkpoint

from qwen2vl.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_real_vocab_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "p.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(
        path
    )
    return str(path)


def qwen2vl(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "qwen2vl.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_one_shot_chat_streams_an_answer(ckpt, picture):
    run = qwen2vl(
        "chat",
        "--model",
        str(ckpt),
        "--dtype",
        "float32",
        "--image",
        picture,
        "--max-new-tokens",
        "6",
        "What is this?",
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "loading weights" in run.stderr


def test_interactive_chat_attaches_media_and_quits(ckpt, picture):
    run = qwen2vl(
        "chat",
        "--model",
        str(ckpt),
        "--dtype",
        "float32",
        "--max-new-tokens",
        "4",
        stdin=f"/image {picture}\nDescribe it.\nAnd again?\n/quit\n",
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("> ") >= 3


def test_interactive_chat_survives_a_bad_image(ckpt):
    run = qwen2vl(
        "chat",
        "--model",
        str(ckpt),
        "--dtype",
        "float32",
        "--max-new-tokens",
        "3",
        stdin="/image /no/such.png\nHi\nHello\n",
    )
    assert run.returncode == 0
    assert "error:" in run.stderr


def test_tokens_reports_the_plan(picture):
    run = qwen2vl("tokens", picture, "--max-pixels", "50000")
    assert run.returncode == 0, run.stderr
    assert "200×100" in run.stdout and "prompt tokens:" in run.stdout


def test_bad_media_is_a_clear_error_and_exit_2(ckpt):
    run = qwen2vl("tokens", "--image", "/no/such/file.png")
    assert run.returncode == 2 and run.stderr.startswith("error:")


@pytest.mark.parametrize(
    "args",
    [
        ["init", "qwen2vl/synth/recipe/model", "--output", "OUT", "--std", "0"],
        ["init", "qwen2vl/synth/recipe/model", "--output", "OUT", "--std", "wide"],
        ["init", "qwen2vl/synth/recipe/model", "--output", "OUT", "--embed-std", "-1"],
        ["eval", "--model", "qwen2vl/synth/recipe/model", "--n", "0"],
    ],
)
def test_bad_numbers_are_refused_before_any_work(args, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    r = qwen2vl(*args)
    assert r.returncode == 2 and "error:" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1", "hi"], "temperature must be >= 0"),
        (["--max-new-tokens", "0", "hi"], "max_new_tokens must be >= 1"),
        (["--top-p", "0", "hi"], "top_p must be in (0, 1]"),
        (["--image", "/no/such.png", "hi"], "/no/such.png"),
        (["--image", "/no/such.png"], "/no/such.png"),  # the interactive chat checks it too
        (["--device", "gpu", "hi"], "--device gpu: expected cpu, cuda, cuda:N or auto"),
        (["--device", "cuda", "hi"], "--device cuda: no CUDA device is available"),
    ],
)
def test_chat_refuses_bad_values_before_reading_weights(
    args, message, ckpt, no_weights, capsys, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["chat", "--model", str(ckpt), *args]) == 2
    assert message in one_error_line(capsys)


def test_video_without_pyav_names_the_extra_before_reading_weights(
    ckpt, no_weights, capsys, monkeypatch, tmp_path
):
    monkeypatch.setitem(sys.modules, "av", None)  # any import of it now fails
    (tmp_path / "clip.mp4").write_bytes(b"not read")
    assert main(["chat", "--model", str(ckpt), "--video", str(tmp_path / "clip.mp4"), "hi"]) == 2
    assert 'pip install "qwen2vl[video]"' in one_error_line(capsys)


def test_chat_loads_on_the_resolved_device_and_dtype(ckpt, picture, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    asked = stop_at_load(monkeypatch, "qwen2vl.generation.pipeline.load_for_inference")
    with pytest.raises(Loading):
        main(["chat", "--model", str(ckpt), "--image", picture, "hi"])
    assert asked == {"dtype": torch.bfloat16, "device": torch.device("cpu")}


def test_version_is_the_installed_packages(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"qwen2vl {version('qwen2vl')}\n"
