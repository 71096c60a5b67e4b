"""Training data: a JSONL file of conversations, checked up front, encoded with labels.

File format, one conversation per line, in the message schema the Processor and the server take:

    {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/cat.png"},
                                               {"type": "text", "text": "What is this?"}]},
                  {"role": "assistant", "content": "A cat."}],
     "tools": [...]}                      # optional, OpenAI-style, as in chat.render
    [{"role": "user", ...}, {"role": "assistant", ...}]     # a bare message list works too

Other keys of the object (an "id", say) are ignored. Media paths are relative to the data file;
file://, data: URIs and absolute paths work as in the Processor.

Labels: only what an assistant message writes — its text and its `<|im_end|>` — is trained;
system, user and tool turns and every visual token are -100 (the paper's text-only supervision).

`validate_file` encodes every line once (images decoded, so unreadable files are found) and
reports every bad line with its number. A conversation longer than `max_tokens` is never cut (a cut
inside a run of visual tokens breaks the image/feature count): its images are shrunk through
`max_pixels` until it fits, or it is dropped; both are logged.

Boxes in assistant answers: Qwen2-VL's `(x1,y1),(x2,y2)` in 0..999 of the image need nothing.
A family that writes pixels of the resized input (Qwen2.5-VL, markup or `{"bbox_2d": [...]}`)
takes them in pixels of the ORIGINAL image, as annotation tools give them; each answer's boxes
are rescaled to the size the last image before it is resized to, so they stay right whatever
`max_pixels` (or shrinking to fit) does.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from qwen2vl.chat import render_training_ids, validate_messages, visual_parts
from qwen2vl.errors import MediaError, Qwen2VLError
from qwen2vl.grounding import PIXEL_FRAME_MODELS, map_points
from qwen2vl.media import process_part
from qwen2vl.model.qwen2vl import IGNORE_INDEX
from qwen2vl.processor import Processor, VisualEncoding

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
_MEDIA_KEYS = ("image", "image_url", "video", "video_url")
_SHRINK_TRIES = 4


class DataError(Qwen2VLError, ValueError):
    """The training data has bad lines (each listed with its line number)."""


@dataclass
class Sample:
    """One conversation, encoded: ids with visual placeholders expanded, labels (not shifted)."""

    ids: list[int]
    labels: list[int]  # the id where trained, IGNORE_INDEX elsewhere
    visuals: list[VisualEncoding] = field(default_factory=list)  # with pixel_values, in order

    @property
    def targets(self) -> int:
        """Tokens the loss is taken on (the first token is never a target: nothing precedes it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass(frozen=True)
class SampleInfo:
    """What packing and loss normalisation need to know of a sample without encoding it."""

    tokens: int
    targets: int
    visual: bool


class TrainData(Protocol):
    """What the trainer reads: per-sample info up front, samples on demand."""

    info: list[SampleInfo]

    def __getitem__(self, i: int) -> Sample: ...


class SampleList:
    """Already-encoded samples (tests, or callers with their own encoding)."""

    def __init__(self, samples: Sequence[Sample]):
        self.samples = list(samples)
        self.info = [SampleInfo(len(s.ids), s.targets, bool(s.visuals)) for s in self.samples]

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]


@dataclass
class Record:
    """A valid line: its messages (media resolved, maybe shrunk) and its encoded size."""

    line: int
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    info: SampleInfo


class ConversationData:
    """Validated records, encoded with the processor each time a sample is read."""

    def __init__(self, records: Sequence[Record], processor: Processor):
        self.records = list(records)
        self.processor = processor
        self.info = [r.info for r in self.records]

    def __getitem__(self, i: int) -> Sample:
        r = self.records[i]
        return encode_conversation(r.messages, self.processor, tools=r.tools)


@dataclass
class DataReport:
    records: list[Record]
    problems: list[tuple[int, str]]  # (line number, what is wrong): bad lines
    notes: list[tuple[int, str]]  # (line number, what was done): shrunk or dropped samples
    lines: int

    def summary(self, path: str | Path) -> str:
        return (
            f"{path}: {self.lines} lines, {len(self.records)} usable, "
            f"{len(self.problems)} bad, {sum('dropped' in n for _, n in self.notes)} dropped "
            f"as too long, {sum('shrunk' in n for _, n in self.notes)} shrunk"
        )


# -- encoding -----------------------------------------------------------------------------------


def encode_conversation(
    messages: Sequence[Mapping[str, Any]],
    processor: Processor,
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> Sample:
    """Ids, labels on assistant output only, and processed media of one conversation."""
    tok = processor.tokenizer
    if processor.model_type in PIXEL_FRAME_MODELS:
        messages = boxes_in_resized_pixels(messages, processor.plan(messages, tools=tools).visuals)
    _, items, mask = render_training_ids(
        messages, tok, tools=tools, template=processor.chat_template
    )
    enc = processor.encode(messages, add_generation_prompt=False, tools=tools)
    full: list[bool] = []  # the mask expanded as the processor expanded each pad
    prev = 0
    for item, vis in zip(items, enc.visuals, strict=True):
        full += mask[prev : item.index] + [False] * vis.tokens
        prev = item.index + 1
    full += mask[prev:]
    visual_ids = {tok.vision_start_id, tok.vision_end_id, tok.image_pad_id, tok.video_pad_id}
    labels = [
        t if trained and t not in visual_ids else IGNORE_INDEX
        for t, trained in zip(enc.ids, full, strict=True)
    ]
    return Sample(ids=enc.ids, labels=labels, visuals=enc.visuals)


def boxes_in_resized_pixels(
    messages: Sequence[Mapping[str, Any]], visuals: Sequence[VisualEncoding]
) -> list[Mapping[str, Any]]:
    """The messages with each assistant answer's boxes moved from pixels of the original image
    to pixels of the resized one, for the last image before the answer (`visuals` in message
    order, as the processor plans them)."""
    out: list[Mapping[str, Any]] = []
    seen, image = 0, None
    for message in messages:
        for kind, _ in visual_parts([message]):
            image = visuals[seen] if kind == "image" else image
            seen += 1
        if message.get("role") != "assistant" or image is None:
            out.append(message)
            continue
        out.append(_with_text(message, _to_resized(image.plan)))
    return out


def _to_resized(plan) -> Callable[[str], str]:
    sx, sy = plan.resized_width / plan.width, plan.resized_height / plan.height
    return lambda text: map_points(text, lambda x, y: (x * sx, y * sy))


def _with_text(message: Mapping[str, Any], change: Callable[[str], str]) -> dict[str, Any]:
    content = message.get("content")
    if isinstance(content, str):
        return {**message, "content": change(content)}
    if isinstance(content, list):
        parts = [
            {**p, "text": change(p["text"])} if isinstance(p.get("text"), str) else p
            for p in content
        ]
        return {**message, "content": parts}
    return dict(message)


def parse_line(obj: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, tools) of one decoded JSON line; ValueError says what shape was expected."""
    if isinstance(obj, list):
        return obj, None
    if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
        tools = obj.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise ValueError("'tools' must be a list")
        return obj["messages"], tools
    raise ValueError('expected {"messages": [...]} or a list of messages')


def resolve_media(messages: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    """A copy of messages with relative media paths made absolute against `base`."""
    out = copy.deepcopy(messages)
    for message in out:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            for key in _MEDIA_KEYS:
                value = part.get(key)
                if isinstance(value, dict) and isinstance(value.get("url"), str):
                    value["url"] = _resolve(value["url"], base)
                elif isinstance(value, list):
                    part[key] = [_resolve(v, base) if isinstance(v, str) else v for v in value]
                elif isinstance(value, str):
                    part[key] = _resolve(value, base)
    return out


def _resolve(source: str, base: Path) -> str:
    if _SCHEME.match(source) or Path(source).is_absolute():  # data:, file://, http(s)://, /abs
        return source
    return str(base / source)


# -- validation ---------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, decoded object or the JSONDecodeError) for every non-blank line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, e


def validate_file(
    path: str | Path,
    processor: Processor,
    *,
    max_tokens: int,
    too_long: str = "shrink",
    shard: tuple[int, int] = (0, 1),
) -> DataReport:
    """Read and encode every line; bad lines are collected, never raised one by one.

    shard=(k, n) checks only every n-th line starting at the k-th (processes split the work and
    merge their reports with `merge_reports`); `lines` still counts them all."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    records, problems, notes, lines = [], [], [], 0
    for number, obj in read_jsonl(path):
        lines += 1
        if (lines - 1) % shard[1] != shard[0]:
            continue
        try:
            record, note = _check_line(obj, number, path.parent, processor, max_tokens, too_long)
        except (Qwen2VLError, ValueError, OSError) as e:
            problems.append((number, _describe(e)))
            continue
        if note:
            notes.append((number, note))
            log.warning("%s:%d: %s", path, number, note)
        if record is not None:
            records.append(record)
    return DataReport(records, problems, notes, lines)


def merge_reports(reports: Sequence[DataReport]) -> DataReport:
    """One report from the shards' reports, in line order."""
    by_line = lambda x: x[0] if isinstance(x, tuple) else x.line  # noqa: E731
    return DataReport(
        records=sorted((r for rep in reports for r in rep.records), key=by_line),
        problems=sorted((p for rep in reports for p in rep.problems), key=by_line),
        notes=sorted((n for rep in reports for n in rep.notes), key=by_line),
        lines=reports[0].lines,
    )


def _describe(e: Exception) -> str:
    if isinstance(e, json.JSONDecodeError):
        return f"not valid JSON: {e}"
    return str(e)


def _check_line(obj, number, base, processor, max_tokens, too_long):
    if isinstance(obj, Exception):
        raise obj
    messages, tools = parse_line(obj)
    messages = resolve_media(validate_messages(messages), base)
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: nothing to learn from")
    try:
        sample = encode_conversation(messages, processor, tools=tools)
    except MediaError as e:
        raise MediaError(f"{_culprit(messages, processor)}: {e}") from e
    if not sample.targets:
        raise ValueError("the assistant turns hold no tokens to learn from")
    messages, sample, note = _fit(messages, tools, sample, processor, max_tokens, too_long)
    if sample is None:
        return None, note
    info = SampleInfo(len(sample.ids), sample.targets, bool(sample.visuals))
    return Record(number, messages, tools, info), note


def _culprit(messages, processor: Processor) -> str:
    """Which media part of a conversation fails on its own (only run once encoding failed)."""
    for kind, part in visual_parts(messages):
        try:
            process_part(dict(part), processor.media, access=processor.access)
        except Qwen2VLError:
            source = part.get(kind) or part.get(f"{kind}_url")
            return f"{kind} {str(source)[:200]!r}"
    return "media"


def _fit(messages, tools, sample, processor, max_tokens, too_long):
    """Shrink the media of a too-long sample until it fits: (messages, sample or None, note)."""
    original = len(sample.ids)
    for _ in range(_SHRINK_TRIES):
        if len(sample.ids) <= max_tokens:
            if len(sample.ids) == original:
                return messages, sample, ""
            note = (
                f"{original} tokens > max_tokens {max_tokens}: images shrunk to {len(sample.ids)}"
            )
            return messages, sample, note
        visual = sum(v.tokens for v in sample.visuals)
        room = max_tokens - (len(sample.ids) - visual)
        if too_long == "drop" or not visual or room < len(sample.visuals) * 4:
            break
        messages = _shrunk(messages, sample.visuals, 0.95 * room / visual)
        sample = encode_conversation(messages, processor, tools=tools)
    return messages, None, f"{original} tokens > max_tokens {max_tokens}: dropped"


def _shrunk(messages, visuals: list[VisualEncoding], scale: float) -> list[dict[str, Any]]:
    """Messages whose visual parts get max_pixels scaled so their token counts scale by `scale`."""
    limits = {}
    for v in visuals:
        t, h, w = v.grid_thw
        pixels = int(h * w * 14 * 14 * scale)  # per frame, at the resized size
        limits[id(v.part)] = {"max_pixels": pixels, "min_pixels": min(pixels, 28 * 28)}
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                limit = limits.get(id(part))
                if limit is not None:  # a forced size would defeat the new bound
                    part = {k: v for k, v in part.items() if not k.startswith("resized_")} | limit
                parts.append(part)
            message = {**message, "content": parts}
        out.append(message)
    return out


def processor_with(processor: Processor, max_pixels: int | None) -> Processor:
    """The processor with every image/frame capped at max_pixels (None: unchanged)."""
    if max_pixels is None:
        return processor
    media = processor.media
    media = replace(
        media,
        max_pixels=max_pixels,
        min_pixels=min(media.min_pixels, max_pixels),
        video_max_pixels=max_pixels,
        video_min_pixels=min(media.video_min_pixels, max_pixels),
    )
    capped = copy.copy(processor)
    capped.media = media
    return capped


def format_problems(path: str | Path, problems: list[tuple[int, str]]) -> str:
    return "\n".join(f"{path}:{number}: {what}" for number, what in problems)
