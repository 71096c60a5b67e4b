"""Grounding as data: answers with boxes carry them parsed, in pixels of the request's last
image, as the `grounding` extension field (non-stream message and the streamed chunk before the
finish reason), whatever skip_special_tokens does to the text."""

from __future__ import annotations

import pytest
from PIL import Image

from qwen2vl.default_model import DEFAULT_MODEL_DIR
from qwen2vl.grounding import Box, Frame
from qwen2vl.media import MediaConfig
from qwen2vl.processor import load_processor
from qwen2vl.serve.responses import Choice, grounding_target
from qwen2vl.serve.sequence import Delta, Request
from qwen2vl.synth.dataset import make_sample
from qwen2vl.synth.demo import DEMO_SEED
from qwen2vl.synth.eval import IOU_HIT, iou

QUESTION = "Find the blue star in the image and output its bounding box."


@pytest.fixture(scope="module")
def default_server(start_server):
    with start_server(DEFAULT_MODEL_DIR) as server:
        yield server


def ask(server, content, **kwargs):
    client = server.client()
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[{"role": "user", "content": content}],
        max_tokens=40,
        temperature=0,
        **kwargs,
    )


def scene_content(data_uri):
    sample = make_sample("grounding", seed=DEMO_SEED, index=0)
    image = sample.images[0]
    content = [
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
        {"type": "text", "text": QUESTION},
    ]
    (star,) = [s for s in sample.shapes if s.label == "blue star"]
    return content, image, star


def test_the_answer_carries_its_box_in_image_pixels(default_server, helpers):
    content, image, star = scene_content(helpers.data_uri)
    message = ask(default_server, content).choices[0].message
    assert "<|box_start|>" not in message.content  # markers skipped by default...
    grounding = message.model_extra["grounding"]  # ...the boxes are still there, as data
    assert (grounding["image"], grounding["width"], grounding["height"]) == (0, *image.size)
    (obj,) = grounding["objects"]
    assert obj["label"] == "blue star"
    found = Box.from_pixels(*obj["boxes"][0], *image.size)
    assert iou(found, Box.from_pixels(*star.corners, *image.size)) >= IOU_HIT


def test_streaming_sends_the_same_field_before_the_finish_reason(default_server, helpers):
    content, _, _ = scene_content(helpers.data_uri)
    whole = ask(default_server, content).choices[0].message.model_extra["grounding"]
    chunks = list(ask(default_server, content, stream=True))
    carrying = [c for c in chunks if c.choices and "grounding" in c.choices[0].delta.model_extra]
    (chunk,) = carrying
    assert chunk.choices[0].delta.model_extra["grounding"] == whole
    assert chunk.choices[0].finish_reason is None
    assert chunks[chunks.index(chunk) + 1].choices[0].finish_reason == "stop"


def test_an_answer_without_boxes_or_a_request_without_images_has_no_field(default_server):
    message = ask(default_server, "Say hello.").choices[0].message
    assert "grounding" not in (message.model_extra or {})


def target_for(model_type: str, *sizes: tuple[int, int]):
    processor = load_processor(None, media=MediaConfig(min_pixels=28 * 28, max_pixels=644 * 322))
    content = [{"type": "image", "image": Image.new("RGB", size)} for size in sizes]
    enc = processor.encode([{"role": "user", "content": content}])
    request = Request(enc.ids, enc.visuals)
    return processor.tokenizer, grounding_target(request, processor.tokenizer, model_type)


def choice_said(tokenizer, target, text: str) -> dict:
    choice = Choice(0, tools_on=False, grounding=target)
    choice.push(Delta(text, tokenizer.encode(text)))
    return choice.grounding_data()


def test_each_family_is_mapped_from_its_own_frame():
    # A 1000x500 photo the processor resizes to 644x308 model pixels.
    tokenizer, qwen2 = target_for("qwen2_vl", (1000, 500))
    assert qwen2.resized == (644, 308)
    markup = (
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|>(500,500),(1000,1000)<|box_end|>"
    )
    assert choice_said(tokenizer, qwen2, markup)["objects"] == [
        {"label": "dog", "boxes": [[500.0, 250.0, 1000.0, 500.0]], "quads": []}
    ]
    _, qwen25 = target_for("qwen2_5_vl", (1000, 500))
    answer = '```json\n[\n\t{"bbox_2d": [322, 154, 644, 308], "label": "dog"}\n]\n```'
    assert choice_said(tokenizer, qwen25, answer)["objects"][0]["boxes"] == [
        [500.0, 250.0, 1000.0, 500.0]
    ]
    assert Frame(644, 308) == Frame(*qwen25.resized)


def test_boxes_land_on_the_last_image_of_the_request():
    tokenizer, target = target_for("qwen2_vl", (64, 64), (1000, 500), (200, 100))
    assert (target.image, target.width, target.height) == (2, 200, 100)
    markup = "<|box_start|>(0,0),(500,500)<|box_end|>"
    assert choice_said(tokenizer, target, markup)["objects"][0]["boxes"] == [[0, 0, 100, 50]]
