"""Bad requests get OpenAI's error JSON with the right status, and the server lives on."""

from __future__ import annotations

import threading
import time

import pytest

openai = pytest.importorskip("openai")
try:  # the openai client brings httpx2 (openai 3.x) or httpx (earlier)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def ask(client, model, content, **kw):
    kw.setdefault("max_tokens", 4)
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], **kw
    )


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def error_of(excinfo) -> dict:
    body = excinfo.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    "content, code",
    [
        ([image("data:image/png;base64,@@not base64@@")], None),
        ([image("data:image/png;base64,aGVsbG8=")], None),  # valid base64, not an image
        ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
         "unsupported_content"),
        ([image("/etc/hostname")], None),  # outside --allowed-local-media-path
        ([image("http://127.0.0.1:9/x.png")], None),  # remote media not enabled
        ([{"type": "image_url", "image_url": {"url": ""}}], None),
    ],
)  # fmt: skip
def test_bad_content_is_400(client, model, content, code):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, model, content + [{"type": "text", "text": "hi"}])
    err = error_of(e)
    assert err["type"] == "invalid_request_error" and err["message"]
    if code:
        assert err["code"] == code


def test_too_many_images_is_400(client, model, helpers):
    uri = helpers.data_uri(helpers.picture(0, (28, 28)))
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, model, [image(uri)] * 3)  # the test server allows 2
    assert error_of(e)["code"] == "too_many_images"


def test_over_the_model_length_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, model, "hello", max_tokens=5000)
    assert error_of(e)["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, model, "hello " * 1100)
    assert error_of(e)["param"] == "messages"


def test_unsupported_options_are_400(client, model):
    with pytest.raises(openai.BadRequestError):
        ask(client, model, "hi", response_format={"type": "json_schema", "json_schema": {}})
    with pytest.raises(openai.BadRequestError):
        ask(client, model, "hi", presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError):
        ask(client, model, "hi", tool_choice="required")  # no tools


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "gpt-4o", "hi")
    assert error_of(e)["code"] == "model_not_found"


@pytest.mark.parametrize(
    "extra", [{"temperature": 5}, {"n": 0}, {"messages": []}, {"max_tokens": 0}]
)
def test_schema_errors_are_400(client, model, extra):
    kw = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**kw)
    assert error_of(e)["code"] == "invalid_schema"


def test_bad_json_unknown_route_and_big_body(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * (3 << 20)}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_server_survives_and_is_idle(server, client, model, helpers):
    assert httpx.get(server.url + "/health").status_code == 200
    assert ask(client, model, "still there?").choices[0].message.content is not None
    helpers.wait_idle(server.engine)


def test_api_key_is_required_when_set(ckpt, start_server):
    with start_server(ckpt, "--api-key", "sekret") as server:
        for key in ("wrong", None):
            headers = {} if key is None else {"Authorization": f"Bearer {key}"}
            r = httpx.get(server.url + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            ask(server.client(api_key="wrong"), "x", "hi")
        good = server.client(api_key="sekret")
        model = good.models.list().data[0].id
        assert ask(good, model, "hi").choices[0].message.content is not None
        # no --allowed-local-media-path on this server: no file is readable by path
        for url in (str(ckpt / "config.json"), (ckpt / "config.json").as_uri()):
            with pytest.raises(openai.BadRequestError) as e:
                ask(good, model, [image(url), {"type": "text", "text": "hi"}])
            assert error_of(e)["code"] == "local_media_refused"
        assert httpx.get(server.url + "/health").status_code == 200  # open for probes


def test_full_queue_is_429_and_recovers(ckpt, start_server):
    with start_server(ckpt, "--max-queue", "1", "--max-num-seqs", "1") as server:
        engine, gate = server.engine, threading.Event()
        step = engine.step
        engine.step = lambda: gate.wait() and step()  # hold the scheduler: requests stay queued
        client = server.client()
        model = client.models.list().data[0].id
        first: list = []
        waiter = threading.Thread(target=lambda: first.append(ask(client, model, "one")))
        waiter.start()
        deadline = time.monotonic() + 10
        while engine.stats()["waiting"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as e:
            ask(client, model, "two")
        assert error_of(e)["code"] == "queue_full"
        gate.set()
        waiter.join(30)
        assert first and first[0].choices[0].finish_reason == "length"
        assert ask(client, model, "three").choices[0].message.content is not None
