"""An OpenAI chat request turned into engine requests: messages normalised, media limits
checked, media decoded and tokenized (the processor), sampling settings resolved.

Runs on a worker thread of the HTTP server, so decoding a large image never blocks the engine.
Every user mistake raises APIError (400) or a qwen2vl error (mapped to 400 by the app).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.processor import Processor
from qwen2vl.serve.engine import visual_key
from qwen2vl.serve.errors import bad_request
from qwen2vl.serve.protocol import ChatCompletionRequest, Message, NamedToolChoice
from qwen2vl.serve.sequence import Request

MEDIA_KEYS = (
    "min_pixels", "max_pixels", "resized_height", "resized_width", "total_pixels", "fps",
    "nframes", "video_start", "video_end", "min_frames", "max_frames",
)  # fmt: skip
REMOTE_OR_INLINE = ("data:", "http://", "https://")
TOOL_CALL_OPEN = '<tool_call>\n{"name": "'
TOOL_CALL_CLOSE = "}\n</tool_call>"


@dataclass
class Limits:
    max_model_len: int
    images: int = 8  # per prompt
    videos: int = 2
    timeout_s: float | None = 600.0


@dataclass
class Prepared:
    requests: list[Request]  # one per choice (n)
    prompt_tokens: int
    tools_on: bool = False
    answer_prefix: str = ""  # text forced at the start of the answer (a required tool call)
    answer_suffix: str = ""  # text that closes it when the constrained arguments are complete


def prepare(
    req: ChatCompletionRequest,
    processor: Processor,
    limits: Limits,
    defaults: dict[str, Any],
) -> Prepared:
    _refuse_unsupported(req)
    messages = [_message(m, i) for i, m in enumerate(req.messages)]
    _check_media_count(messages, limits)
    if processor.allowed_local_dir is None:
        _refuse_local_paths(messages)
    tools, prefix = _tools(req)
    # A named tool's arguments are one JSON object: constrained, then closed by the suffix.
    named = prefix.endswith('"arguments": ')
    wants_json = req.response_format is not None and req.response_format.type == "json_object"
    json_object = named or wants_json
    enc = processor.encode(messages, add_generation_prompt=True, tools=tools)
    ids = enc.ids + (processor.tokenizer.encode(prefix) if prefix else [])
    max_tokens = _max_tokens(req, len(ids), limits.max_model_len)
    keys = [visual_key(v.pixel_values, v.grid_thw) for v in enc.visuals]
    requests = []
    for i in range(req.n):
        seed = req.seed if req.seed is None or req.n == 1 else req.seed + i
        params = _sampling(req, defaults, max_tokens, seed)
        requests.append(
            Request(
                ids,
                enc.visuals,
                keys,
                params,
                top_logprobs=req.top_logprobs or 0,
                skip_special_tokens=req.skip_special_tokens,
                json_object=json_object,
                ignore_eos=req.ignore_eos,
                timeout_s=limits.timeout_s,
            )
        )
    return Prepared(
        requests,
        len(ids),
        tools_on=tools is not None,
        answer_prefix=prefix,
        answer_suffix=TOOL_CALL_CLOSE if named else "",
    )


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    if req.response_format is not None and req.response_format.type == "json_schema":
        raise bad_request(
            "response_format json_schema is not supported; use json_object",
            param="response_format",
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported (use repetition_penalty)", param=name)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")


def _message(m: Message, i: int) -> dict[str, Any]:
    """A message dict the chat code takes: video_url parts become video parts; OpenAI-only
    fields dropped."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if isinstance(m.content, list):
        out["content"] = [_part(p, f"messages[{i}].content[{j}]") for j, p in enumerate(m.content)]
    elif m.content is not None:
        out["content"] = m.content
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    return out


def _part(part: dict[str, Any], where: str) -> dict[str, Any]:
    ptype = part.get("type")
    if ptype in ("text", "image", "video"):
        return part
    if ptype not in ("image_url", "video_url"):
        raise bad_request(
            f"{where}: unsupported content part type {ptype!r}; "
            "expected text, image_url or video_url",
            param=where,
            code="unsupported_content",
        )
    value = part.get(ptype)
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: {ptype} needs a url", param=where)
    keys = {k: part[k] for k in MEDIA_KEYS if k in part}  # per-part extensions...
    if isinstance(value, dict):  # ...also accepted beside the url
        keys.update({k: value[k] for k in MEDIA_KEYS if k in value})
    kind = "image" if ptype == "image_url" else "video"
    return {"type": kind, kind: url, **keys}


def _check_media_count(messages: list[dict[str, Any]], limits: Limits) -> None:
    parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]]
    images = sum(1 for p in parts if isinstance(p, dict) and p.get("type") == "image")
    videos = sum(1 for p in parts if isinstance(p, dict) and p.get("type") == "video")
    for kind, count, limit in (("image", images, limits.images), ("video", videos, limits.videos)):
        if count > limit:
            raise bad_request(
                f"{count} {kind}s in the prompt; at most {limit} allowed",
                param="messages",
                code=f"too_many_{kind}s",
            )


def _refuse_local_paths(messages: list[dict[str, Any]]) -> None:
    """Without --allowed-local-media-path a client may not make the server read its files."""
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m.get("content"), list) else []
        for j, part in enumerate(parts):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("image", "video"):
                continue
            sources = part[kind] if isinstance(part.get(kind), list) else [part.get(kind)]
            for source in sources:
                if isinstance(source, str) and not source.startswith(REMOTE_OR_INLINE):
                    raise bad_request(
                        f"messages[{i}].content[{j}]: local media paths are refused; start the "
                        "server with --allowed-local-media-path DIR to serve files under DIR",
                        param=f"messages[{i}].content[{j}]",
                        code="local_media_refused",
                    )


def _tools(req: ChatCompletionRequest) -> tuple[list[dict] | None, str]:
    """The tools to render (None: none) and the answer prefix a forced tool choice needs."""
    choice = req.tool_choice
    if not req.tools:
        if choice in ("required",) or isinstance(choice, NamedToolChoice):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None, ""
    if choice == "none":
        return None, ""
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if forced and req.response_format is not None and req.response_format.type == "json_object":
        raise bad_request("a forced tool_choice cannot be combined with json_object")
    if choice == "required" and len(req.tools) > 1:
        return tools, TOOL_CALL_OPEN  # the model picks the name (not constrained to the tools)
    if forced:
        name = req.tools[0].function.name if choice == "required" else choice.function.name
        if name not in {t.function.name for t in req.tools}:
            raise bad_request(f"tool_choice names {name!r}, not a tool", param="tool_choice")
        return tools, TOOL_CALL_OPEN + name + '", "arguments": '
    return tools, ""


def _max_tokens(req: ChatCompletionRequest, prompt: int, max_model_len: int) -> int:
    room = max_model_len - prompt
    if room < 1:
        raise bad_request(
            f"the prompt is {prompt} tokens; the model takes at most {max_model_len} "
            "(prompt + completion)",
            param="messages",
            code="context_length_exceeded",
        )
    wanted = req.max_completion_tokens or req.max_tokens
    if wanted is None:
        return room
    if wanted > room:
        raise bad_request(
            f"prompt ({prompt} tokens) + max_tokens ({wanted}) is over the model length "
            f"{max_model_len}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return wanted


def _sampling(
    req: ChatCompletionRequest, defaults: dict[str, Any], max_tokens: int, seed: int | None
) -> SamplingParams:
    def pick(name: str, fallback: Any) -> Any:
        value = getattr(req, name)
        return defaults.get(name, fallback) if value is None else value

    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=pick("temperature", 1.0),  # OpenAI's default
        top_p=pick("top_p", 1.0),
        top_k=max(0, pick("top_k", 0)),
        repetition_penalty=pick("repetition_penalty", 1.0),
        seed=seed,
        stop=stop,
        logprobs=req.logprobs,
    )


def generation_config(path: str | Path) -> tuple[dict[str, Any], list[int]]:
    """Sampling defaults (what vLLM applies too) and stop ids of a checkpoint's
    generation_config.json; ({}, []) without one."""
    try:
        config = json.loads((Path(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}, []
    names = ("temperature", "top_p", "top_k", "repetition_penalty")
    defaults = {k: config[k] for k in names if isinstance(config.get(k), (int, float))}
    if config.get("do_sample") is False:
        defaults["temperature"] = 0.0
    eos = config.get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else [int(e) for e in eos]
    return defaults, eos
