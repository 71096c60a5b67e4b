"""The OpenAI-compatible API through the official `openai` client against a real server."""

from __future__ import annotations

import json

import pytest

from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.media import MediaAccess

openai = pytest.importorskip("openai")

GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def h(helpers):
    return helpers


def user(*parts, text="What is in the picture?"):
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def image_part(url: str, **extra) -> dict:
    return {"type": "image_url", "image_url": {"url": url}, **extra}


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture
def pipe(ckpt, media_dir):
    # Fresh per test: Pipeline's multi-turn prefix reuse would carry over from other tests.
    return Pipeline.from_pretrained(ckpt, dtype="float32", access=MediaAccess(local_dir=media_dir))


def test_models_health_metrics_and_page(server, client, ckpt):
    assert [m.id for m in client.models.list().data] == [ckpt.name]
    try:
        import httpx2 as httpx
    except ImportError:
        import httpx

    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    metrics = httpx.get(server.url + "/metrics").text
    for name in ("queue_length", "running_sequences", "tokens_per_second",
                 "time_to_first_token_seconds_bucket"):  # fmt: skip
        assert f"qwen2vl_{name}" in metrics
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<title>qwen2vl chat</title>" in page.text
    assert httpx.get(server.url + "/static/app.js").status_code == 200


def test_non_stream_text_equals_pipeline(client, model, pipe):
    messages = [{"role": "user", "content": "Say something."}]
    out = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    ref = pipe.complete(messages, max_new_tokens=12)
    choice = out.choices[0]
    assert choice.message.content == ref.text and choice.message.role == "assistant"
    assert choice.finish_reason == "length"
    assert out.usage.prompt_tokens == ref.prompt_tokens and out.usage.completion_tokens == 12
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")


def test_stream_deltas_join_to_the_answer_with_usage_last(client, model, h):
    messages = user(image_part(h.data_uri(h.picture(1))))
    full = client.chat.completions.create(model=model, messages=messages, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=model, messages=messages, stream=True,
            stream_options={"include_usage": True}, **GREEDY,
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


def test_image_as_data_uri_and_as_allowed_file_path_agree(client, model, media_dir, pipe, h):
    path = media_dir / "picture.png"
    by_path = client.chat.completions.create(
        model=model, messages=user(image_part(str(path))), **GREEDY
    )
    by_url = client.chat.completions.create(
        model=model, messages=user(image_part(path.as_uri())), **GREEDY
    )
    by_data = client.chat.completions.create(
        model=model, messages=user(image_part(h.data_uri(h.picture(0)))), **GREEDY
    )
    ref = pipe.chat(user({"type": "image", "image": str(path)}), max_new_tokens=12)
    assert by_path.choices[0].message.content == ref
    assert by_url.choices[0].message.content == ref == by_data.choices[0].message.content


def test_per_part_resize_keys_pass_through(client, model, pipe, h):
    uri = h.data_uri(h.picture(2, (200, 200)))
    small = image_part(uri, max_pixels=56 * 56)
    out = client.chat.completions.create(model=model, messages=user(small), **GREEDY)
    ref = pipe.complete(
        user({"type": "image", "image": uri, "max_pixels": 56 * 56}), max_new_tokens=12
    )
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == ref.prompt_tokens


def test_video_url(client, model, media_dir):
    av = pytest.importorskip("av")
    import numpy as np

    path = media_dir / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(8):
            rgb = np.full((48, 64, 3), 30 * i, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    part = {"type": "video_url", "video_url": {"url": str(path)}, "nframes": 4}
    out = client.chat.completions.create(
        model=model, messages=user(part, text="What happens?"), **GREEDY
    )
    assert out.choices[0].message.content and out.usage.prompt_tokens > 20


def test_forced_tool_call_comes_back_as_tool_calls(client, model):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    out = client.chat.completions.create(
        model=model, messages=messages, tools=tools, tool_choice=choice, max_tokens=40,
        temperature=0,
    )  # fmt: skip
    # A named tool's arguments are constrained to a JSON object: even a random model calls it.
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and out.choices[0].finish_reason == "tool_calls"
    assert isinstance(json.loads(call.function.arguments), dict) and call.id.startswith("call_")
    stream = client.chat.completions.create(
        model=model, messages=messages, tools=tools, tool_choice="required", max_tokens=40,
        temperature=0, stream=True, parallel_tool_calls=False,
    )  # fmt: skip
    chunks = [c.choices[0] for c in stream if c.choices]
    assert not "".join(c.delta.content or "" for c in chunks)  # the call is never shown as text
    (streamed,) = [t for c in chunks for t in c.delta.tool_calls or []]
    assert streamed.function.name == "get_weather" and chunks[-1].finish_reason == "tool_calls"
    assert json.loads(streamed.function.arguments) == json.loads(call.function.arguments)
    # A tools conversation with an earlier call and its result renders and answers.
    history = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
    ]  # fmt: skip
    again = client.chat.completions.create(model=model, messages=history, tools=tools, **GREEDY)
    assert again.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_n_seed_logprobs_and_stop(client, model):
    messages = [{"role": "user", "content": "Tell me a story."}]
    kw = dict(model=model, messages=messages, max_tokens=8, temperature=1.0, seed=5)
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1] and a.usage.completion_tokens == 16
    lp = client.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    entries = lp.choices[0].logprobs.content
    assert len(entries) == 5 and all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries)
    assert entries[0].top_logprobs[0].logprob == pytest.approx(entries[0].logprob)
    full = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0
    )
    text = full.choices[0].message.content
    stop = text[4:7]
    cut = client.chat.completions.create(
        model=model, messages=messages, max_tokens=16, temperature=0, stop=[stop]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_server_is_idle_after_the_requests(server, h):
    h.wait_idle(server.engine)
