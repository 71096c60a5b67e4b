"""Chat messages → the Qwen2-VL prompt: as text, and as injection-safe token ids.

Messages follow the schema users write for qwen-vl-utils and OpenAI: dicts with a `role` in
{system, user, assistant, tool} and `content` that is a string or a list of parts
(`text`, `image`, `image_url`, `video`, `video_url`; media parts keep their per-item keys such
as min_pixels or fps for the processor). Assistant messages may carry OpenAI `tool_calls`.

Without tools, `render` is byte-identical to the official Qwen2-VL chat template
(`QWEN2VL_CHAT_TEMPLATE`). With `tools`, assistant `tool_calls` or `tool` messages it follows the
Qwen2.5 function-calling layout (see tools.py), keeping Qwen2-VL's default system prompt.

`render_ids` builds the token stream from segments: control tokens the template writes become
ids directly; all message text is encoded with the tokenizer's injection guard, so a user typing
`<|im_start|>` or `<|image_pad|>` gets plain text. Grounding tokens (<|box_start|> ...) are
honoured inside assistant text only, since the model writes them there. For text without
special-token surface forms the ids equal tokenizing `render(...)` the ordinary Hugging Face way.

A checkpoint's own chat template (other than the official one) is rendered in a sandboxed Jinja
environment. For ids, every special-token surface form in the message data is first wrapped in
private-use marker characters; after rendering, marked tokens are plain text and unmarked ones
are the template's own control tokens (the approach transformers uses).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from qwen2vl.errors import CheckpointError, MessageError
from qwen2vl.tokenizer import (
    GROUNDING_TOKENS,
    IM_END,
    IM_START,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    Tokenizer,
)
from qwen2vl.tools import (
    TOOL_RESPONSE_END,
    TOOL_RESPONSE_START,
    format_tool_call,
    tool_call_from_message,
    tools_system_text,
    validate_tools,
)

# The official template (Qwen/Qwen2-VL-7B-Instruct chat_template.json), kept verbatim.
QWEN2VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant", "tool")

# Part type (also the key holding its value) → the kind of item it is.
_PART_KIND = {
    "text": "text",
    "image": "image",
    "image_url": "image",
    "video": "video",
    "video_url": "video",
}


@dataclass(frozen=True)
class VisualItem:
    """One image or video of a conversation, in prompt order."""

    kind: Literal["image", "video"]
    part: Mapping[str, Any]  # the user's content part, per-item keys included
    index: int  # position of its single <|image_pad|>/<|video_pad|> id in the rendered ids

    @property
    def source(self) -> Any:
        """What to load: a path/URL/PIL image/frame list; the url for *_url parts."""
        value = self.part[part_type(self.part)]
        return value["url"] if isinstance(value, Mapping) else value


@dataclass(frozen=True)
class Segment:
    """A run of rendered prompt: either text, or one control token written by the template."""

    text: str
    special: bool = False


# -- validation ---------------------------------------------------------------------------------


def part_type(part: Mapping[str, Any]) -> str:
    """The part's type: its `type`, or the one known key it has (qwen-vl-utils allows both)."""
    ptype = part.get("type")
    if ptype is not None:
        return ptype
    keys = [k for k in _PART_KIND if k in part]
    return keys[0] if len(keys) == 1 else ""


def validate_messages(messages: Any) -> list[Mapping[str, Any]]:
    """Check the message list; MessageError names the first problem and where it is."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise MessageError("messages must be a non-empty list of dicts")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise MessageError(f"{where} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise MessageError(f"{where}: unknown role {role!r}; expected one of {ROLES}")
        _validate_content(message, where)
    return list(messages)


def _validate_content(message: Mapping[str, Any], where: str) -> None:
    content, role = message.get("content"), message["role"]
    if role == "assistant" and message.get("tool_calls"):
        if not isinstance(message["tool_calls"], (list, tuple)):
            raise MessageError(f"{where}: tool_calls must be a list")
        for call in message["tool_calls"]:
            tool_call_from_message(call)
        if content is None:
            return
    if isinstance(content, str):
        return
    if not isinstance(content, (list, tuple)):
        raise MessageError(f"{where}: content must be a string or a list of parts")
    for j, part in enumerate(content):
        kind = _validate_part(part, f"{where}.content[{j}]")
        if role == "system" and kind != "text":
            # The official template would render it; the model never saw system images.
            raise MessageError(f"{where}: a system message cannot hold an {kind}")


def _validate_part(part: Any, where: str) -> str:
    if not isinstance(part, Mapping):
        raise MessageError(f"{where} must be a dict, got {type(part).__name__}")
    ptype = part_type(part)
    if ptype not in _PART_KIND:
        known = ", ".join(_PART_KIND)
        raise MessageError(f"{where}: unknown part type {part.get('type')!r}; expected {known}")
    others = [k for k in _PART_KIND if k in part and k != ptype]
    if others:
        # The official template tests the keys before the type; refuse rather than guess.
        raise MessageError(f"{where}: a {ptype!r} part must not also have {others}")
    value = part.get(ptype)
    if ptype == "text":
        if not isinstance(value, str):
            raise MessageError(f"{where}: text must be a string, got {type(value).__name__}")
    elif ptype.endswith("_url"):
        url = value.get("url") if isinstance(value, Mapping) else value
        if not isinstance(url, str) or not url:
            raise MessageError(f"{where}: {ptype} needs a url string (or {{'url': ...}})")
    elif value is None or (isinstance(value, (str, list, tuple)) and not value):
        raise MessageError(f"{where}: {ptype} part has no {ptype!r} value")
    return _PART_KIND[ptype]


def visual_parts(messages: Sequence[Mapping[str, Any]]) -> list[tuple[str, Mapping[str, Any]]]:
    """(kind, part) of every image and video in message order."""
    found = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            for part in content:
                kind = _PART_KIND.get(part_type(part), "text")
                if kind != "text":
                    found.append((kind, part))
    return found


# -- rendering ----------------------------------------------------------------------------------


class _Segments:
    """Collects segments, merging adjacent text so it tokenizes as one run."""

    def __init__(self, add_vision_id: bool) -> None:
        self.items: list[Segment] = []
        self.add_vision_id = add_vision_id
        self.counts = {"image": 0, "video": 0}

    def text(self, text: str, *, grounding: bool = False) -> None:
        if grounding:
            for i, piece in enumerate(_grounding_splitter().split(text)):
                if i % 2:  # odd pieces are the captured tokens
                    self.control(piece)
                else:
                    self.text(piece)
        elif text:
            if self.items and not self.items[-1].special:
                text = self.items.pop().text + text
            self.items.append(Segment(text))

    def control(self, token: str) -> None:
        self.items.append(Segment(token, special=True))

    def visual(self, kind: str) -> None:
        self.counts[kind] += 1
        if self.add_vision_id:
            label = "Picture" if kind == "image" else "Video"
            self.text(f"{label} {self.counts[kind]}: ")
        self.control(VISION_START)
        self.control(IMAGE_PAD if kind == "image" else VIDEO_PAD)
        self.control(VISION_END)

    def content(self, content: Any, *, grounding: bool) -> None:
        if isinstance(content, str):
            self.text(content, grounding=grounding)
            return
        for part in content or ():
            ptype = part_type(part)
            if _PART_KIND[ptype] == "text":
                self.text(part["text"], grounding=grounding)
            else:
                self.visual(_PART_KIND[ptype])

    def turn(self, role: str, content: Any) -> None:
        self.control(IM_START)
        self.text(role + "\n")
        self.content(content, grounding=role == "assistant")
        self.control(IM_END)
        self.text("\n")


def _segments(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    add_vision_id: bool,
    tools: list[dict[str, Any]] | None,
) -> list[Segment]:
    out = _Segments(add_vision_id)
    first = messages[0]
    if tools:
        has_system = first["role"] == "system"
        system = _plain_text(first["content"]) if has_system else DEFAULT_SYSTEM_PROMPT
        out.turn("system", tools_system_text(system, tools))
        messages = messages[1:] if has_system else messages
    elif first["role"] != "system":
        out.turn("system", DEFAULT_SYSTEM_PROMPT)
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "tool":
            prev_tool = i > 0 and messages[i - 1]["role"] == "tool"
            next_tool = i + 1 < len(messages) and messages[i + 1]["role"] == "tool"
            _tool_result(out, message, opens=not prev_tool, closes=not next_tool)
        elif role == "assistant" and message.get("tool_calls"):
            _assistant_calls(out, message)
        else:
            out.turn(role, message["content"])
    if add_generation_prompt:
        out.control(IM_START)
        out.text("assistant\n")
    return out.items


def _assistant_calls(out: _Segments, message: Mapping[str, Any]) -> None:
    out.control(IM_START)
    out.text("assistant")
    if message.get("content"):
        out.text("\n")
        out.content(message["content"], grounding=True)
    for entry in message["tool_calls"]:
        out.text("\n" + format_tool_call(tool_call_from_message(entry)), grounding=True)
    out.control(IM_END)
    out.text("\n")


def _tool_result(out: _Segments, message: Mapping[str, Any], *, opens: bool, closes: bool) -> None:
    # Qwen2.5 convention: consecutive tool results share one user turn.
    if opens:
        out.control(IM_START)
        out.text("user")
    out.text("\n" + TOOL_RESPONSE_START)
    out.content(message["content"], grounding=False)
    out.text(TOOL_RESPONSE_END)
    if closes:
        out.control(IM_END)
        out.text("\n")


def _plain_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part_type(part) == "text")


@lru_cache(maxsize=1)
def _grounding_splitter() -> re.Pattern[str]:
    tokens = sorted(GROUNDING_TOKENS, key=len, reverse=True)
    return re.compile("(" + "|".join(re.escape(t) for t in tokens) + ")")


def is_official_template(template: str | None) -> bool:
    """True for None or the official Qwen2-VL template (outer whitespace ignored).

    Only outer whitespace: inner whitespace is prompt text, so a template differing there
    renders differently and must go through Jinja.
    """
    return template is None or template.strip() == QWEN2VL_CHAT_TEMPLATE.strip()


def render(
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    add_vision_id: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    template: str | None = None,
) -> str:
    """The prompt text for `messages` (see the module docstring for what it matches)."""
    messages = validate_messages(messages)
    tool_list = validate_tools(tools) if tools is not None else None
    options = dict(add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    if not is_official_template(template):
        return _render_jinja(template, messages, tools=tool_list, **options)
    return "".join(s.text for s in _segments(messages, tools=tool_list, **options))


def render_ids(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    add_generation_prompt: bool = False,
    add_vision_id: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    template: str | None = None,
) -> tuple[list[int], list[VisualItem]]:
    """Token ids of the prompt plus its images/videos in order, each with its pad's index.

    Each visual has exactly one pad id here; the processor expands it to the visual's token
    count. MessageError when the template's pads do not match the media in the messages.
    """
    messages = validate_messages(messages)
    tool_list = validate_tools(tools) if tools is not None else None
    options = dict(add_generation_prompt=add_generation_prompt, add_vision_id=add_vision_id)
    if is_official_template(template):
        segs = _segments(messages, tools=tool_list, **options)
    else:
        text = _render_jinja(template, messages, tools=tool_list, marks=tokenizer, **options)
        segs = _split_marked(text, tokenizer)
    ids: list[int] = []
    for seg in segs:
        ids.extend([tokenizer.special_id(seg.text)] if seg.special else tokenizer.encode(seg.text))
    return ids, _locate_visuals(ids, visual_parts(messages), tokenizer)


def render_training_ids(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    add_vision_id: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    template: str | None = None,
) -> tuple[list[int], list[VisualItem], list[bool]]:
    """`render_ids` of a whole conversation plus, per id, whether the model is trained to write
    it: each assistant message's tokens after its `<|im_start|>assistant\\n` header, through its
    `<|im_end|>` (not the newline after it). Visual tokens inside an assistant turn are marked too;
    the caller masks them.

    Template-agnostic: the ids of messages[:i] with the generation prompt are a prefix of the
    full ids, and assistant message i owns what follows up to the next `<|im_end|>`. Only the
    prompt's last token may differ (BPE can merge its trailing newline with the answer's start).
    MessageError when a template renders earlier turns differently once later ones exist.
    """
    messages = validate_messages(messages)
    options = dict(add_vision_id=add_vision_id, tools=tools, template=template)
    ids, visuals = render_ids(messages, tokenizer, add_generation_prompt=False, **options)
    mask = [False] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # An assistant-first conversation gets the default system turn, as the template adds it.
        head = list(messages[:i]) or [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}]
        prompt, _ = render_ids(head, tokenizer, add_generation_prompt=True, **options)
        start = 0
        while start < min(len(prompt), len(ids)) and prompt[start] == ids[start]:
            start += 1
        if start < len(prompt) - 1 or tokenizer.im_end_id not in ids[start:]:
            raise MessageError(
                f"messages[{i}]: the chat template does not render the conversation before this "
                "assistant turn as a prefix of the whole; cannot tell which tokens it wrote"
            )
        end = ids.index(tokenizer.im_end_id, start)
        mask[start : end + 1] = [True] * (end + 1 - start)
    return ids, visuals, mask


def _locate_visuals(
    ids: list[int], parts: list[tuple[str, Mapping[str, Any]]], tokenizer: Tokenizer
) -> list[VisualItem]:
    pad_kind = {tokenizer.image_pad_id: "image", tokenizer.video_pad_id: "video"}
    pads = [(i, pad_kind[t]) for i, t in enumerate(ids) if t in pad_kind]
    if [k for _, k in pads] != [k for k, _ in parts]:
        raise MessageError(
            f"the chat template wrote {len(pads)} visual placeholders "
            f"({[k for _, k in pads]}) for the messages' {len(parts)} ({[k for k, _ in parts]})"
        )
    return [VisualItem(kind, part, i) for (i, kind), (_, part) in zip(pads, parts, strict=True)]


# -- checkpoint templates (sandboxed Jinja) -----------------------------------------------------

# Private-use characters around special-token text that came from the messages, not the template.
_MARK_START, _MARK_END = "\ue000", "\ue001"


@lru_cache(maxsize=1)
def _jinja_env() -> Any:
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: Jinja's own would HTML-escape and sort keys.
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def raise_exception(message: str) -> None:
        raise MessageError(f"the chat template refused the messages: {message}")

    # The settings transformers renders chat templates with.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2 import TemplateError

    try:
        return _jinja_env().from_string(template)
    except TemplateError as e:
        raise CheckpointError(f"the chat template does not compile: {e}") from e


def _render_jinja(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    add_vision_id: bool,
    tools: list[dict[str, Any]] | None,
    marks: Tokenizer | None = None,
) -> str:
    """Render with a checkpoint's template; with `marks`, wrap message special tokens in marks."""
    compiled = _compile(template)
    user_re = assistant_re = None
    if marks is not None:
        user_re = _token_regex(marks.special_tokens)
        assistant_re = _token_regex(
            tuple(t for t in marks.special_tokens if t not in GROUNDING_TOKENS)
        )
    data = [
        {
            k: _template_data(v, assistant_re if m["role"] == "assistant" else user_re)
            for k, v in m.items()
            if v is not None  # like transformers: OpenAI sends content=None with tool_calls
        }
        for m in messages
    ]
    try:
        return compiled.render(
            messages=data,
            tools=_template_data(tools, user_re),
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
        )
    except MessageError:
        raise
    except Exception as e:  # a template failing on data it did not expect
        raise MessageError(f"the chat template failed on these messages: {e!r}") from e


def _template_data(value: Any, mark: re.Pattern[str] | None) -> Any:
    """Plain JSON-like copy for the sandbox; non-JSON objects (images) become '<TypeName>'."""
    if isinstance(value, str):
        value = str(value)
        if mark is None:
            return value
        value = value.replace(_MARK_START, "").replace(_MARK_END, "")
        return mark.sub(lambda m: _MARK_START + m.group(0) + _MARK_END, value)
    if value is None or type(value) in (bool, int, float):
        return value
    if isinstance(value, Mapping):
        return {str(k): _template_data(v, mark) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_template_data(v, mark) for v in value]
    return f"<{type(value).__name__}>"


def _split_marked(text: str, tokenizer: Tokenizer) -> list[Segment]:
    """Rendered text → segments: unmarked special tokens are controls, marked ones plain text."""
    tokens = _token_regex(tokenizer.special_tokens).pattern
    pattern = re.compile(
        f"{_MARK_START}(?P<marked>{tokens}){_MARK_END}|(?P<control>{tokens})"
        f"|[{_MARK_START}{_MARK_END}]"
    )
    out = _Segments(add_vision_id=False)
    pos = 0
    for m in pattern.finditer(text):
        out.text(text[pos : m.start()])
        if m.group("control"):
            out.control(m.group("control"))
        elif m.group("marked"):
            out.text(m.group("marked"))
        pos = m.end()  # a lone marker (a template cut a marked token) is dropped
    out.text(text[pos:])
    return out.items


@lru_cache(maxsize=16)
def _token_regex(tokens: tuple[str, ...]) -> re.Pattern[str]:
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(alternatives or "(?!)")


# -- files --------------------------------------------------------------------------------------


def load_chat_template(checkpoint_dir: str | Path) -> str | None:
    """A checkpoint's chat template, or None: chat_template.jinja, then chat_template.json,
    then tokenizer_config.json (the places transformers versions have saved it)."""
    root = Path(checkpoint_dir)
    if (root / "chat_template.jinja").is_file():
        return (root / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = root / name
        if not path.is_file():
            continue
        try:
            template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except ValueError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from e
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default")
        if isinstance(template, str):
            return template
    return None
