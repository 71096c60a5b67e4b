"""The command line, run as a real process."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_qwen2vl import tiny_real_vocab_checkpoint


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
