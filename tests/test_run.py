"""Batch inference: run over a file equals the requests run one by one; a bad line gets an error
line and the rest are answered; a run killed midway resumes to the output of an unbroken one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from qwen2vl.cli import main
from qwen2vl.default_model import DEFAULT_MODEL_DIR
from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.grounding import objects_in_pixels, parse_grounding
from qwen2vl.run import Settings, answered, make_engine, run_file
from qwen2vl.synth import make_sample
from qwen2vl.synth.dataset import conversation
from qwen2vl.train.data import resolve_media

TASKS = ("shape", "count", "ocr", "grounding", "compare", "video_direction")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The reference path decodes one row at a time: on a busy machine with few cores, two
    intra-op threads waiting on each other make it ten times slower. Not what is tested here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(DEFAULT_MODEL_DIR, dtype="float32")


def write_media(root: Path, n: int = 12) -> list[list[dict]]:
    """n synthetic questions (images of several sizes, two videos) with media saved under root,
    as conversations whose paths are relative to root."""
    out = []
    for i in range(n):
        s = make_sample(TASKS[i % len(TASKS)], seed=7, index=i)
        images, frames = [], []
        for j, image in enumerate(s.images):
            images.append(f"media/{i}_{j}.png")
            image.save(root / images[-1])
        for j, frame in enumerate(s.video or []):
            frames.append(f"media/{i}_f{j}.png")
            frame.save(root / frames[-1])
        out.append(conversation(s, images=images, frames=frames or None, answer=False))
    return out


def mixed_requests(root: Path, n: int) -> list[dict]:
    """n requests: text only, images, videos; a few sampled with a seed; short answers."""
    (root / "media").mkdir(exist_ok=True)
    pool = write_media(root)
    requests = []
    for i in range(n):
        if i % 5 == 4:
            messages = [{"role": "user", "content": f"Count from {i} onwards."}]
        else:
            messages = pool[i % len(pool)]
        request = {"id": f"r{i}", "messages": messages, "max_tokens": 3 + i % 6}
        if i % 17 == 3:
            request |= {"temperature": 0.8, "seed": i}
        requests.append(request)
    return requests


def one_by_one(pipe, request: dict, root: Path) -> dict:
    out = pipe.complete(
        resolve_media(request["messages"], root),
        max_new_tokens=request["max_tokens"],
        temperature=request.get("temperature", 0.0),
        seed=request.get("seed"),
    )
    usage = {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": len(out.token_ids),
        "total_tokens": out.prompt_tokens + len(out.token_ids),
    }
    answer = {"id": request["id"], "text": out.text, "finish_reason": out.finish_reason}
    grounding = grounding_on_last_image(pipe, out.token_ids, request["messages"], root)
    return answer | ({"grounding": grounding} if grounding else {}) | {"usage": usage}


def grounding_on_last_image(pipe, token_ids, messages, root: Path) -> dict | None:
    """The run's grounding field, worked out from the answer's markup and the image file."""
    markup = pipe.processor.decode(token_ids, skip_special_tokens=False)
    objects = [o for o in parse_grounding(markup) if o.boxes or o.quads]
    images = [p["image"] for m in messages if isinstance(m["content"], list)
              for p in m["content"] if p.get("type") == "image"]  # fmt: skip
    if not (objects and images):
        return None
    width, height = Image.open(root / images[-1]).size
    return {"image": len(images) - 1, "width": width, "height": height,
            "objects": objects_in_pixels(objects, width, height)}  # fmt: skip


def check_batch_equals_one_by_one(pipe, root: Path, n: int) -> None:
    requests = mixed_requests(root, n)
    batch = pipe.run_batch(requests, base_dir=root, max_num_seqs=8)
    assert batch == [one_by_one(pipe, r, root) for r in requests]


def test_batch_equals_one_by_one(pipe, tmp_path):
    check_batch_equals_one_by_one(pipe, tmp_path, 24)


@pytest.mark.slow
def test_batch_of_200_mixed_requests_equals_one_by_one(pipe, tmp_path):
    check_batch_equals_one_by_one(pipe, tmp_path, 200)


def test_bad_lines_get_an_error_and_the_run_goes_on(pipe, tmp_path):
    good = mixed_requests(tmp_path, 3)
    missing = {
        "id": "gone",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "media/nope.png"},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
    }
    lines = [
        json.dumps(good[0]),
        '{"id": "broken", "messages": [',  # bad JSON: its id is its line number
        json.dumps(missing),
        json.dumps({"id": "schema", "messages": "not a list"}),
        json.dumps({"id": "role", "messages": [{"role": "robot", "content": "hi"}]}),
        json.dumps({"id": "two", "messages": good[1]["messages"], "n": 2}),
        json.dumps(good[1]),
        json.dumps({"id": "r1", "messages": good[2]["messages"]}),  # a repeated id
        "",
        json.dumps(good[2]["messages"]),  # a bare message list, no id
    ]  # fmt: skip
    data = tmp_path / "requests.jsonl"
    data.write_text("\n".join(lines) + "\n")
    engine = make_engine(pipe.model, pipe.processor, stop_token_ids=pipe.stop_token_ids)
    out = tmp_path / "answers.jsonl"
    state = run_file(engine, data, out, Settings(max_tokens=4, base_dir=tmp_path))
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert state.done == len(rows) == 9 and state.errors == 6
    errors = {k: v["error"]["code"] for k, v in rows.items() if "error" in v}
    assert errors == {
        "line-2": "invalid_json",
        "gone": "media_error",
        "schema": "invalid_request",
        "role": "invalid_request",
        "two": "invalid_request",
        "line-8": "duplicate_id",
    }
    assert "does not exist" in rows["gone"]["error"]["message"]
    assert rows["r0"]["text"] and rows["line-10"]["usage"]["completion_tokens"] >= 1
    assert [k for k in rows if k.startswith("line-")] == ["line-2", "line-8", "line-10"]


def test_a_last_line_cut_short_is_dropped_and_rewritten(tmp_path):
    out = tmp_path / "answers.jsonl"
    out.write_text('{"id": "a", "text": "x"}\n{"id": 7, "text": "y"}\n{"id": "c", "te')
    assert answered(out) == {"a", 7}
    assert out.read_text() == '{"id": "a", "text": "x"}\n{"id": 7, "text": "y"}\n'
    out.write_text("not ours\n")
    with pytest.raises(Exception, match="not an answer line"):
        answered(out)


def qwen2vl_run(data: Path, out: Path) -> subprocess.Popen:
    args = ["--data", str(data), "--output", str(out), "--dtype", "float32", "--max-num-seqs", "2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "qwen2vl", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_killed_run_resumes_to_the_unbroken_result(pipe, tmp_path):
    requests = mixed_requests(tmp_path, 20)
    data = tmp_path / "requests.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in requests))
    engine = make_engine(pipe.model, pipe.processor, stop_token_ids=pipe.stop_token_ids)
    unbroken = tmp_path / "unbroken.jsonl"
    run_file(engine, data, unbroken, Settings(base_dir=tmp_path))
    out = tmp_path / "answers.jsonl"
    first = qwen2vl_run(data, out)
    deadline = time.monotonic() + 60
    while not (out.exists() and out.read_text().count("\n") >= 3):
        assert first.poll() is None, first.communicate()[1]
        assert time.monotonic() < deadline, "no answers within a minute"
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert out.read_text().count("\n") < len(requests)  # killed midway
    second = qwen2vl_run(data, out)
    _, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "tok/s" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in requests)  # once each
    expected = {r["id"]: r for r in map(json.loads, unbroken.read_text().splitlines())}
    assert {r["id"]: r for r in rows} == expected


def test_run_batch_refuses_unknown_settings(pipe):
    with pytest.raises(TypeError, match="max_new_tokens"):
        pipe.run_batch([], max_new_tokens=3)


def test_run_refuses_a_missing_data_file_before_loading(tmp_path, capsys, no_weights):
    out = tmp_path / "answers.jsonl"
    assert main(["run", "--data", str(tmp_path / "none.jsonl"), "--output", str(out)]) == 2
    assert "no such data file" in capsys.readouterr().err and not out.exists()
