"""The embedded default model says what it is: its /v1/models card carries a note (what it
knows, two example questions, the command for a real checkpoint) and `serve` logs it at start;
a real checkpoint's card has no note. The examples are asked here and must be answered right."""

from __future__ import annotations

import argparse
import base64
import io
import logging

import pytest
from fastapi.testclient import TestClient

from qwen2vl.default_model import DEFAULT_MODEL_DIR
from qwen2vl.grounding import Box, parse_grounding
from qwen2vl.serve.cli import add_arguments, build_app
from qwen2vl.synth.dataset import make_sample
from qwen2vl.synth.demo import DEMO_SEED
from qwen2vl.synth.eval import IOU_HIT, iou


def app_for(*argv: str):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return build_app(parser.parse_args(["--dtype", "float32", "--log-level", "warning", *argv]))


@pytest.fixture(scope="module")
def default_client():
    with TestClient(app_for()) as client:  # no --model: the embedded default
        yield client


def card(client: TestClient) -> dict:
    response = client.get("/v1/models")
    assert response.status_code == 200
    return response.json()["data"][0]


def test_the_default_models_card_says_what_it_knows_and_how_to_serve_a_real_one(default_client):
    about = card(default_client)["qwen2vl"]
    assert about["default_model"] is True
    assert "synthetic world" in about["note"]
    assert [e["ask"] for e in about["examples"]] == [
        "What shape is this?",
        "Find the blue star in the image and output its bounding box.",
    ]
    assert about["real_model"] == "qwen2vl serve --model Qwen/Qwen2-VL-2B-Instruct"


def test_serve_logs_one_line_about_the_default_model_at_start(caplog):
    with caplog.at_level(logging.INFO, logger="qwen2vl.serve.app"):
        with TestClient(app_for("--model", str(DEFAULT_MODEL_DIR))):
            pass
    lines = [r.getMessage() for r in caplog.records if r.name == "qwen2vl.serve.app"]
    assert len(lines) == 1
    assert "synthetic world" in lines[0] and "Qwen/Qwen2-VL-2B-Instruct" in lines[0]


def test_a_real_checkpoint_has_no_note_and_logs_none(ckpt, caplog):
    with caplog.at_level(logging.INFO, logger="qwen2vl.serve.app"):
        with TestClient(app_for("--model", str(ckpt))) as client:
            assert card(client)["qwen2vl"] == {"default_model": False}
    assert not [r for r in caplog.records if r.name == "qwen2vl.serve.app"]


def test_the_notes_examples_are_answered_right_on_the_demos_scenes(default_client):
    shape, grounding = card(default_client)["qwen2vl"]["examples"]
    assert shape["attach"] == "qwen2vl-demo/shape_0.png"
    sample = make_sample("shape", seed=DEMO_SEED, index=0)
    assert ask(default_client, sample.images[0], shape["ask"]) == sample.answer

    assert grounding["attach"] == "qwen2vl-demo/grounding_0.png"
    sample = make_sample("grounding", seed=DEMO_SEED, index=0)
    image = sample.images[0]
    (found,) = parse_grounding(ask(default_client, image, grounding["ask"]))
    (drawn,) = [s for s in sample.shapes if s.label == found.label == "blue star"]
    assert iou(found.boxes[0], Box.from_pixels(*drawn.corners, *image.size)) >= IOU_HIT


def ask(client: TestClient, image, question: str) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    content = [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": question}]
    body = {
        "model": card(client)["id"],
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 40,
        "temperature": 0,
        "skip_special_tokens": False,
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]
