"""The HTTP server: OpenAI-compatible routes over the engine, plus /health, /metrics and the page.

    POST /v1/chat/completions   GET /v1/models   GET /health   GET /metrics   GET / (chat page)

With an API key, every route but /health and the page (/, /static) requires it. Requests are
prepared (media decoded, tokenized) on a worker thread, then submitted to the engine
thread; its events come back through an asyncio queue. A client that goes away cancels its
sequences. Every error is OpenAI's error JSON with a 4xx status, 500 only for our own bugs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen2vl.default_model import DEFAULT_MODEL_DIR, DEFAULT_MODEL_NOTE
from qwen2vl.errors import Qwen2VLError
from qwen2vl.serve import protocol
from qwen2vl.serve.engine import Engine, QueueFull, Unavailable
from qwen2vl.serve.errors import APIError, model_not_found, queue_full, too_large, unauthorized
from qwen2vl.serve.prepare import Limits, Prepared, check_structure, prepare
from qwen2vl.serve.protocol import ChatCompletionRequest
from qwen2vl.serve.responses import (
    Choice,
    coalesce,
    content_chunk,
    final_chunks,
    grounding_target,
    logprobs_block,
    role_chunk,
)
from qwen2vl.serve.responses import sse as sse_line
from qwen2vl.serve.sequence import Delta, Event, Finish, Sequence

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    model_name: str
    limits: Limits
    aliases: tuple[str, ...] = ()  # other names accepted in "model" (e.g. the path given)
    api_key: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # generation_config sampling
    max_body_bytes: int = 64 * 1024 * 1024
    # Requests whose media are decoded at once: each may hold a decoded image of up to
    # --max-image-pixels, so this bounds the memory of a burst, not just of one request.
    prepare_workers: int = 4


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    about = about_model(config)  # the model card's extension field

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        started = not engine.started  # the app owns an engine it starts (tests may start it)
        if about["default_model"]:
            logger.info("%s For a real model: %s", about["note"], about["real_model"])
        if started:
            engine.start()
        yield
        if started:
            engine.stop()

    app = FastAPI(title="qwen2vl", lifespan=lifespan)
    app.state.engine, app.state.config = engine, config
    app.state.preparing = asyncio.Semaphore(config.prepare_workers)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(Auth, api_key=config.api_key)  # outermost: no body read without the key

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        text = engine.metrics.render(engine.stats())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return protocol.model_list(config.model_name, CREATED, about)

    @app.post(
        "/v1/chat/completions",
        openapi_extra={"requestBody": {"content": {"application/json": {"schema": SCHEMA}}}},
    )
    async def chat_completions(request: Request):
        body = await _parse(request, config.limits)
        return await _chat(engine, config, body, request)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


CREATED = protocol.now()
SCHEMA = ChatCompletionRequest.model_json_schema()
OPEN_PATHS = ("/health", "/")  # and /static/*: probes and the page itself need no key


# What the page's empty state and the start-up log say when the embedded default model serves.
# The examples are the demo's own scenes (`qwen2vl demo` writes them; seeded, so always these).
def about_model(config: ServerConfig) -> dict[str, Any]:
    """The model card's "qwen2vl" field. serve/cli.py lists the resolved checkpoint directory
    among the aliases, so that is where the default model shows."""
    if str(DEFAULT_MODEL_DIR.resolve()) not in config.aliases:
        return {"default_model": False}
    return {"default_model": True, **DEFAULT_MODEL_NOTE}


class Auth:
    """ASGI middleware: with an API key, every route but the open ones needs
    'Authorization: Bearer KEY' (the docs and /metrics included)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        open_path = path in OPEN_PATHS or path.startswith("/static/")
        if scope["type"] != "http" or self.api_key is None or open_path:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers", [])).get(b"authorization", b"")
        scheme, _, token = given.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("latin-1"), self.api_key.encode("utf-8")
        ):
            return await _error_response(unauthorized())(scope, receive, send)
        return await self.app(scope, receive, send)


async def _parse(request: Request, limits: Limits) -> ChatCompletionRequest:
    """The body as a request: JSON parsed on a worker thread, cheap bounds first, then the
    schema. Every failure is a 400 naming the field."""
    raw = await request.body()
    try:
        data = await run_in_threadpool(json.loads, raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise APIError(400, "The request body is not valid JSON", code="invalid_json") from e
    check_structure(data, limits)
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        raise _schema_error(e.errors(include_url=False, include_input=False)) from e


# ---- chat completions -----------------------------------------------------------------------


async def _chat(engine: Engine, config: ServerConfig, body: ChatCompletionRequest, request):
    if body.model not in (config.model_name, *config.aliases):
        raise model_not_found(body.model, config.model_name)
    try:
        async with request.app.state.preparing:
            prepared = await run_in_threadpool(
                prepare, body, engine.processor, config.limits, config.defaults
            )
    except Qwen2VLError as e:  # bad media, messages, tools or sampling settings
        raise APIError(400, str(e), param=e.param or "messages", code=e.code) from e
    events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
    seqs = _submit(engine, prepared, events)
    head = (protocol.new_id(), protocol.now(), body.model)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, engine, seqs))
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        stream = _stream(engine, prepared, seqs, events, head, include_usage, watcher)
        return StreamingResponse(stream, media_type="text/event-stream")
    try:
        return await _collect(engine, prepared, seqs, events, head)
    finally:
        watcher.cancel()
        for seq in seqs:
            if not seq.finished:
                engine.cancel(seq)


def _submit(engine: Engine, prepared: Prepared, events: asyncio.Queue) -> list[Sequence]:
    loop = asyncio.get_running_loop()

    def bridge(index: int):
        def on_event(event: Event) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        return on_event

    seqs: list[Sequence] = []
    try:
        for i, req in enumerate(prepared.requests):
            seqs.append(engine.submit(req, bridge(i)))
    except QueueFull as e:
        for seq in seqs:
            engine.cancel(seq)
        raise queue_full(str(e)) from e
    except Unavailable as e:
        raise APIError(503, str(e), type_="server_error", code="unavailable") from e
    except ValueError as e:  # over the model length (prepare checks first)
        raise APIError(400, str(e), code="context_length_exceeded") from e
    return seqs


async def _cancel_on_disconnect(request: Request, engine: Engine, seqs: list[Sequence]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for seq in seqs:
        engine.cancel(seq)


async def _collect(
    engine: Engine, prepared: Prepared, seqs: list[Sequence], events: asyncio.Queue, head
) -> JSONResponse:
    choices = _choices(prepared, engine)
    n = len(choices)
    reasons: dict[int, str] = {}
    while len(reasons) < n:
        i, event = await events.get()
        if isinstance(event, Delta):
            choices[i].push(event)
            continue
        _raise_for(event)
        reasons[i] = event.reason
    tok = engine.processor.tokenizer
    out = []
    for c in choices:
        message, reason = c.message(reasons[c.index])
        wanted = prepared.requests[c.index].params.logprobs
        logprobs = logprobs_block(tok, c.logprobs) if wanted else None
        out.append(
            {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": reason}
        )
    completion = sum(c.tokens for c in choices)
    usage = protocol.usage(prepared.prompt_tokens, completion, seqs[0].cached_tokens)
    body = protocol.completion(*head, out, usage)
    return JSONResponse(body)


def _choices(prepared: Prepared, engine: Engine) -> list[Choice]:
    model_type = engine.model.cfg.model_type
    return [
        Choice(
            i,
            tools_on=prepared.tools_on,
            grounding=grounding_target(req, engine.processor.tokenizer, model_type),
        )
        for i, req in enumerate(prepared.requests)
    ]


def _raise_for(event: Finish) -> None:
    if event.reason == "timeout":
        raise APIError(504, event.message, type_="timeout", code="timeout")
    if event.reason == "error":
        raise APIError(500, event.message, type_="server_error")
    if event.reason == "cancelled":
        raise APIError(503, event.message or "cancelled", type_="server_error", code="cancelled")


async def _stream(
    engine: Engine,
    prepared: Prepared,
    seqs: list[Sequence],
    events: asyncio.Queue,
    head: tuple[str, int, str],
    include_usage: bool,
    watcher: asyncio.Task,
) -> AsyncIterator[str]:
    tok = engine.processor.tokenizer
    choices = _choices(prepared, engine)
    n = len(choices)
    try:
        for i in range(n):
            yield sse_line(role_chunk(i, head))
        done, failed = 0, False
        while done < n and not failed:
            for i, event in coalesce(await _drain(events)):
                choice = choices[i]
                if isinstance(event, Delta):
                    content = choice.push(event)
                    lp = logprobs_block(tok, event.logprobs or [])
                    if content or lp:
                        yield sse_line(content_chunk(choice, content, head, lp))
                elif event.reason in ("timeout", "error", "cancelled"):
                    yield sse_line(_error_chunk(event))  # mid-stream: the status is already sent
                    failed = True
                    break
                else:
                    for body in final_chunks(choice, event.reason, head):
                        yield sse_line(body)
                    done += 1
        if include_usage and not failed:
            completion = sum(c.tokens for c in choices)
            usage = protocol.usage(prepared.prompt_tokens, completion, seqs[0].cached_tokens)
            yield sse_line(protocol.chunk(*head, [], usage))
        yield sse_line("[DONE]")
    finally:  # normal end, or the client went away (the task is cancelled)
        watcher.cancel()
        for seq in seqs:
            if not seq.finished:
                engine.cancel(seq)


async def _drain(events: asyncio.Queue) -> list[tuple[int, Event]]:
    """The next event, and every other one already waiting."""
    items = [await events.get()]
    while not events.empty():
        items.append(events.get_nowait())
    return items


def _error_chunk(event: Finish) -> dict[str, Any]:
    type_ = "timeout" if event.reason == "timeout" else "server_error"
    return protocol.error_body(event.message or event.reason, type_, code=event.reason)


# ---- errors and limits ----------------------------------------------------------------------


def _error_response(e: APIError) -> JSONResponse:
    message, param = _encodable(e.message), None if e.param is None else _encodable(e.param)
    body = protocol.error_body(message, e.type, param=param, code=e.code)
    return JSONResponse(body, status_code=e.status)


def _encodable(text: str) -> str:
    """Client text echoed in an error may hold lone surrogates, which JSON bodies cannot."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _schema_error(errors: list[dict[str, Any]]) -> APIError:
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or None
    message = "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ())) or 'body'}: {err.get('msg')}"
        for err in errors[:5]
    )
    return APIError(400, message, param=where, code="invalid_schema")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = [{**err, "loc": err.get("loc", ())[1:]} for err in e.errors()]
        return _error_response(_schema_error(errors))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _error_response(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def bug(_: Request, e: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return _error_response(APIError(500, "internal server error", type_="server_error"))


class BodyLimit:
    """ASGI middleware: 413 for a body over max_bytes, counted as it arrives (not trusting
    Content-Length alone). The body is buffered here and replayed to the app."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await _error_response(too_large(self.max_bytes))(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await _error_response(too_large(self.max_bytes))(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
