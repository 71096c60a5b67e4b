"""An OpenAI chat request turned into engine requests: messages normalised, media limits
checked, media decoded and tokenized (the processor), sampling settings resolved.

Cost is checked before it is paid: `check_structure` bounds the raw JSON before the schema is
validated; every media part's keys are type-checked and clamped to the server's limits; every
source is read once through the processor's MediaAccess (the one place local and remote reads are
allowed or refused); the answer's grammar (response_format, guided_regex, a forced tool_choice)
is compiled before any source is read; the prompt is planned from headers alone and refused when
it does not fit, before any pixel is decoded.

Runs on a worker thread of the HTTP server, so decoding a large image never blocks the engine.
Every user mistake raises APIError (400) or a qwen2vl error (mapped to 400 by the app).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen2vl.chat import part_type
from qwen2vl.errors import MediaError, shown
from qwen2vl.generation import grammar
from qwen2vl.generation.grammar import Grammar
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.media.sampling import FPS_MAX_FRAMES
from qwen2vl.media.source import MAX_REMOTE_VIDEO_BYTES, MediaAccess, read_source
from qwen2vl.processor import Processor
from qwen2vl.serve.engine import visual_key
from qwen2vl.serve.errors import bad_request
from qwen2vl.serve.protocol import ChatCompletionRequest, Message, NamedToolChoice
from qwen2vl.serve.sequence import Request
from qwen2vl.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Per-part media keys (qwen-vl-utils' names) and what a value must be.
PIXEL_KEYS = ("min_pixels", "max_pixels", "total_pixels")
COUNT_KEYS = ("resized_height", "resized_width", "nframes", "min_frames", "max_frames")
SECOND_KEYS = ("video_start", "video_end")
MEDIA_KEYS = PIXEL_KEYS + COUNT_KEYS + SECOND_KEYS + ("fps", "sample_fps")
MEDIA_TYPES = {"image": "image", "image_url": "image", "video": "video", "video_url": "video"}
MAX_DEPTH = 32  # JSON nesting; tool schemas rarely pass 10
MAX_TOOLS = 128  # OpenAI's own limit


@dataclass
class Limits:
    max_model_len: int
    images: int = 8  # per prompt
    videos: int = 2
    timeout_s: float | None = 600.0
    max_tokens_default: int = 2048  # completion tokens when a request names none
    max_messages: int = 256
    max_parts: int = 64  # content parts of one message
    max_frames: int = FPS_MAX_FRAMES  # frames of a video, listed or sampled
    max_pixels: int | None = None  # clamp for per-part pixel keys; None: the checkpoint's
    chars_per_token: int = 32  # text beyond max_model_len * this is refused before tokenizing

    def __post_init__(self) -> None:
        for name in ("max_model_len", "max_tokens_default", "max_messages", "max_parts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class Prepared:
    requests: list[Request]  # one per choice (n)
    prompt_tokens: int
    tools_on: bool = False


def check_structure(body: Any, limits: Limits) -> None:
    """Cheap bounds on the parsed JSON before the schema is validated (which costs microseconds
    a value: a million empty messages would take half a minute to refuse): message and part
    counts, text length, nesting depth, and strings that cannot be encoded (lone surrogates)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > limits.max_messages:
        raise bad_request(
            f"{len(messages)} messages; at most {limits.max_messages} allowed",
            param="messages",
            code="too_many_messages",
        )
    tools = body.get("tools")
    if isinstance(tools, list) and len(tools) > MAX_TOOLS:
        raise bad_request(f"{len(tools)} tools; at most {MAX_TOOLS} allowed", param="tools")
    chars = 0
    for i, m in enumerate(messages if isinstance(messages, list) else []):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and len(content) > limits.max_parts:
            raise bad_request(
                f"messages[{i}] has {len(content)} content parts; at most {limits.max_parts}",
                param=f"messages[{i}].content",
                code="too_many_parts",
            )
        texts = content if isinstance(content, list) else [{"text": content}]
        chars += sum(len(p["text"]) for p in texts if isinstance(p.get("text"), str))
    if chars > limits.max_model_len * limits.chars_per_token:
        raise bad_request(
            f"the messages hold {chars} characters of text, far more than a context of "
            f"{limits.max_model_len} tokens takes",
            param="messages",
            code="context_length_exceeded",
        )
    _check_values(body, "", 0)


def _check_values(value: Any, where: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise bad_request(f"the request nests deeper than {MAX_DEPTH} levels at {where}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(
                f"{where or 'body'}: not valid Unicode ({e.reason})", param=where
            ) from e
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_values(key, where, depth + 1)
            _check_values(item, f"{where}.{key}" if where else key, depth + 1)
    elif isinstance(value, list):
        for j, item in enumerate(value):
            _check_values(item, f"{where}[{j}]", depth + 1)


def prepare(
    req: ChatCompletionRequest,
    processor: Processor,
    limits: Limits,
    defaults: dict[str, Any],
) -> Prepared:
    _refuse_unsupported(req)
    clamp = _Clamp(processor, limits)
    messages = [_message(m, i, clamp) for i, m in enumerate(req.messages)]
    _check_media_count(messages, limits)
    tools = _tools(req)
    answer = _grammar(req, processor.tokenizer)  # before any source is read
    _read_media(messages, processor.access)
    kw = dict(add_generation_prompt=True, tools=tools)
    planned = len(processor.encode(messages, pixels=False, **kw).ids)
    params = _choice_params(req, defaults, _max_tokens(req, planned, limits))  # still no pixels
    enc = processor.encode(messages, **kw)
    if len(enc.ids) != planned:  # an EXIF orientation found after the pixels changed a size
        params = _choice_params(req, defaults, _max_tokens(req, len(enc.ids), limits))
    keys = [visual_key(v.pixel_values, v.grid_thw) for v in enc.visuals]
    requests = [
        Request(
            enc.ids,
            enc.visuals,
            keys,
            choice,
            top_logprobs=req.top_logprobs or 0,
            skip_special_tokens=req.skip_special_tokens,
            grammar=answer,
            ignore_eos=req.ignore_eos,
            timeout_s=limits.timeout_s,
        )
        for choice in params
    ]
    return Prepared(requests, len(enc.ids), tools_on=tools is not None)


def _refuse_unsupported(req: ChatCompletionRequest) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name):
            raise bad_request(f"{name} is not supported (use repetition_penalty)", param=name)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")


def _message(m: Message, i: int, clamp: _Clamp) -> dict[str, Any]:
    """A message dict the chat code takes: media parts in one form ({"type": kind, kind: source
    or frame list, keys...}) with checked, clamped keys; OpenAI-only fields dropped."""
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    if isinstance(m.content, list):
        where = f"messages[{i}].content"
        out["content"] = [_part(p, f"{where}[{j}]", clamp) for j, p in enumerate(m.content)]
    elif m.content is not None:
        out["content"] = m.content
    if m.tool_calls:
        out["tool_calls"] = m.tool_calls
    return out


def _part(part: dict[str, Any], where: str, clamp: _Clamp) -> dict[str, Any]:
    ptype = part_type(part)
    if ptype == "text":
        return part
    kind = MEDIA_TYPES.get(ptype)
    if kind is None:
        raise bad_request(
            f"{where}: unsupported content part type {shown(ptype)}; "
            "expected text, image_url or video_url",
            param=where,
            code="unsupported_content",
        )
    value = part.get(ptype)
    keys = {k: part[k] for k in MEDIA_KEYS if part.get(k) is not None}  # per-part extensions...
    if isinstance(value, dict):  # ...also accepted beside the url
        keys.update({k: value[k] for k in MEDIA_KEYS if value.get(k) is not None})
        value = value.get("url")
    frames = value if kind == "video" and isinstance(value, list) else None
    for j, source in enumerate(frames if frames is not None else [value]):
        if not isinstance(source, str) or not source:
            at = where if frames is None else f"{where}.{ptype}[{j}]"
            raise bad_request(f"{at}: {ptype} needs a url string", param=at)
    if frames is not None and len(frames) > clamp.limits.max_frames:
        raise bad_request(
            f"{where}: {len(frames)} frames; at most {clamp.limits.max_frames} allowed",
            param=where,
            code="too_many_frames",
        )
    return {"type": kind, kind: value, **clamp.keys(kind, keys, where)}


class _Clamp:
    """Per-part media keys checked for type and range, and clamped to the server's maxima, so
    that no key can make a small upload cost more than the server allows."""

    def __init__(self, processor: Processor, limits: Limits):
        media = processor.media
        self.limits = limits
        self.pixels = limits.max_pixels or max(media.max_pixels, media.video_max_pixels)
        factor = media.patch_size * media.merge_size
        # The most pixels a whole video can use and still fit the context.
        self.total = limits.max_model_len * factor * factor * media.temporal_patch_size

    def keys(self, kind: str, keys: dict[str, Any], where: str) -> dict[str, Any]:
        out = {}
        for name, value in keys.items():
            if name == "sample_fps" and kind == "image":
                continue
            _check_key(name, value, f"{where}.{name}")
            out[name] = min(value, self._maximum(name)) if name not in SECOND_KEYS else value
        h, w = out.get("resized_height"), out.get("resized_width")
        if h is not None and w is not None and h * w > self.pixels:
            scale = math.sqrt(self.pixels / (h * w))
            out["resized_height"], out["resized_width"] = (
                max(1, int(h * scale)),
                max(1, int(w * scale)),
            )
        if out != keys:
            logger.debug("%s: media keys clamped to the server's limits: %s", where, out)
        return out

    def _maximum(self, name: str) -> float:
        if name == "total_pixels":
            return self.total
        if name in PIXEL_KEYS or name.startswith("resized_"):
            return self.pixels
        if name in ("nframes", "min_frames", "max_frames"):
            return self.limits.max_frames
        return math.inf  # fps, sample_fps: the frame count bounds what they can cost


def _check_key(name: str, value: Any, param: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if name in PIXEL_KEYS or name in COUNT_KEYS:
        least = 0 if name == "min_frames" else 1
        if not (isinstance(value, int) and number and value >= least):
            raise bad_request(
                f"{param} must be an integer >= {least}, got {shown(value)}", param=param
            )
    elif not (number and math.isfinite(value) and (value > 0 if "fps" in name else value >= 0)):
        rule = "a number > 0" if "fps" in name else "a number of seconds >= 0"
        raise bad_request(f"{param} must be {rule}, got {shown(value)}", param=param)


def _read_media(messages: list[dict[str, Any]], access: MediaAccess) -> None:
    """Replace every media source by what it holds (bytes, or a checked local path), read once
    through the access policy: planning and decoding then read no source twice."""
    for i, m in enumerate(messages):
        parts = m.get("content") if isinstance(m.get("content"), list) else []
        for j, part in enumerate(parts):
            kind = part.get("type")
            if kind not in ("image", "video"):
                continue
            where = f"messages[{i}].content[{j}]"
            value = part[kind]
            cap = {"max_remote_bytes": MAX_REMOTE_VIDEO_BYTES} if kind == "video" else {}
            try:
                if isinstance(value, list):
                    part[kind] = [read_source(frame, access) for frame in value]
                else:
                    part[kind] = read_source(value, access, **cap)
            except MediaError as e:
                raise bad_request(f"{where}: {e}", param=where, code=e.code) from e


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


def _tools(req: ChatCompletionRequest) -> list[dict] | None:
    """The tools to render (None: none)."""
    choice = req.tool_choice
    if not req.tools:
        if choice in ("required",) or isinstance(choice, NamedToolChoice):
            raise bad_request("tool_choice needs tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in {t.function.name for t in req.tools}:
            raise bad_request(f"tool_choice names {name!r}, not a tool", param="tool_choice")
    return [t.model_dump(exclude_none=True) for t in req.tools]


def _grammar(req: ChatCompletionRequest, tokenizer: Tokenizer) -> Grammar | None:
    """The grammar the answer follows (None: free text), compiled: a schema or regex that does
    not compile is a 400 naming it. llguidance's fuel limits bound the compile, check_structure
    the schema's size."""
    fmt = req.response_format
    wanted = {
        "response_format": fmt is not None and fmt.type != "text",
        "guided_regex": req.guided_regex is not None,
        "tool_choice": bool(req.tools) and (req.tool_choice == "required" or _named(req)),
    }
    asked = [name for name, on in wanted.items() if on]
    if len(asked) > 1:
        raise bad_request(f"{' and '.join(asked)} cannot be combined", param=asked[-1])
    if not asked:
        return None
    where = asked[0]
    try:
        if where == "tool_choice":
            text = _tool_grammar(req)
        elif where == "guided_regex":
            text = grammar.regex(req.guided_regex)
        elif fmt.type == "json_object":
            text = grammar.json_object()
        elif fmt.json_schema is None:
            where = "response_format.json_schema"
            raise grammar.GrammarError("json_schema needs {'name': ..., 'schema': {...}}")
        else:
            where = "response_format.json_schema.schema"
            text = grammar.json_schema(fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict))
        return Grammar(tokenizer, text)
    except grammar.GrammarError as e:
        raise bad_request(f"{where}: {e}", param=where, code=e.code or "invalid_grammar") from e


def _named(req: ChatCompletionRequest) -> bool:
    return isinstance(req.tool_choice, NamedToolChoice)


def _tool_grammar(req: ChatCompletionRequest) -> str:
    """Calls to the named tool (one call) or to any of them ("required": one, or more with
    parallel_tool_calls), each tool's schema checked on its own first so that a 400 names the
    one at fault."""
    specs = []
    for i, tool in enumerate(req.tools):
        f = tool.function
        if _named(req) and f.name != req.tool_choice.function.name:
            continue
        spec = grammar.ToolSpec(f.name, f.parameters, bool(f.strict))
        try:
            grammar.check(grammar.tool_calls([spec], several=False))
        except grammar.GrammarError as e:
            where = f"tools[{i}].function.parameters"
            raise bad_request(f"{where}: {e}", param=where, code="invalid_grammar") from e
        specs.append(spec)
    return grammar.tool_calls(specs, several=req.parallel_tool_calls and not _named(req))


def _max_tokens(req: ChatCompletionRequest, prompt: int, limits: Limits) -> int:
    room = limits.max_model_len - prompt
    if room < 1:
        raise bad_request(
            f"the prompt is {prompt} tokens; the model takes at most {limits.max_model_len} "
            "(prompt + completion)",
            param="messages",
            code="context_length_exceeded",
        )
    wanted = req.max_completion_tokens or req.max_tokens
    if wanted is None:
        return min(room, limits.max_tokens_default)
    if wanted > room:
        raise bad_request(
            f"prompt ({prompt} tokens) + max_tokens ({wanted}) is over the model length "
            f"{limits.max_model_len}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return wanted


def _choice_params(
    req: ChatCompletionRequest, defaults: dict[str, Any], max_tokens: int
) -> list[SamplingParams]:
    """One choice's sampling settings each (n of them; seeds count up from the request's)."""
    seeds = [req.seed if req.seed is None or req.n == 1 else req.seed + i for i in range(req.n)]
    return [_sampling(req, defaults, max_tokens, seed) for seed in seeds]


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
