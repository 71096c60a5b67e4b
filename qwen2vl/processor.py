"""Messages in, model batch out: the chat template, the tokenizer and the media pipeline joined.

One conversation is rendered to ids with one placeholder per image/video (``chat.render_ids``,
injection-safe), each visual item is processed (``media.process_part``, per-item keys honoured) and
its placeholder expanded to grid_t*grid_h*grid_w/merge^2 tokens. Several conversations are
left-padded into one batch. ``plan`` runs the same path on metadata only (no pixels).

Every video records its seconds per temporal grid step (temporal_patch_size / sampled fps); a
checkpoint whose M-RoPE puts videos on a time axis (Qwen2.5-VL: vision ``tokens_per_second``)
gets them in its batches as ``second_per_grid_ts``, as transformers' Qwen2.5-VL processor does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qwen2vl.chat import load_chat_template, render, render_ids
from qwen2vl.errors import MessageError
from qwen2vl.media import MediaAccess, MediaConfig, load_media_config, plan_part, process_part
from qwen2vl.media.source import DEFAULT_ACCESS
from qwen2vl.tokenizer import Tokenizer

Messages = Sequence[Mapping[str, Any]]


@dataclass
class VisualEncoding:
    """One image or video of a conversation, processed (or only planned)."""

    kind: str  # "image" | "video"
    part: Mapping[str, Any]
    grid_thw: tuple[int, int, int]
    tokens: int
    plan: Any  # media.ImagePlan | media.VideoPlan (sizes, frames, timestamps)
    pixel_values: torch.Tensor | None = None  # [t*h*w, 3*2*14*14]; None when only planned
    second_per_grid: float | None = None  # video: temporal_patch_size / sampled fps; image: None


def position_inputs(
    visuals: Sequence[VisualEncoding], device: torch.device | str | None = None
) -> dict[str, torch.Tensor | None]:
    """What ``Qwen2VL.positions`` / ``mrope_positions`` need of a sequence's visual items, as
    keyword arguments: image_grid_thw, video_grid_thw and second_per_grid_ts (None where there
    is no such item; the seconds are read only by checkpoints with absolute time)."""
    images = [v.grid_thw for v in visuals if v.kind == "image"]
    videos = [v for v in visuals if v.kind == "video"]
    tensor = lambda x, dtype: torch.tensor(x, dtype=dtype, device=device) if x else None  # noqa: E731
    return {
        "image_grid_thw": tensor(images, torch.long),
        "video_grid_thw": tensor([v.grid_thw for v in videos], torch.long),
        "second_per_grid_ts": tensor([v.second_per_grid for v in videos], torch.float32),
    }


@dataclass
class Encoding:
    """One conversation: ids with placeholders expanded, and its visual items in order."""

    ids: list[int]
    visuals: list[VisualEncoding] = field(default_factory=list)


@dataclass
class TokenPlan:
    """What a conversation will cost before running the model."""

    prompt_tokens: int
    text_tokens: int
    visuals: list[VisualEncoding]
    max_model_len: int | None

    @property
    def fits(self) -> bool:
        return self.max_model_len is None or self.prompt_tokens <= self.max_model_len


class Processor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        media: MediaConfig | None = None,
        chat_template: str | None = None,
        *,
        access: MediaAccess = DEFAULT_ACCESS,
        max_model_len: int | None = None,
        absolute_time: bool = False,
        model_type: str = "qwen2_vl",
    ):
        self.tokenizer = tokenizer
        self.media = media or MediaConfig()
        self.chat_template = chat_template
        self.access = access  # where media may be read from (see media.MediaAccess)
        self.max_model_len = max_model_len
        self.absolute_time = absolute_time  # batches carry second_per_grid_ts (Qwen2.5-VL)
        self.model_type = model_type  # the family: which frame its boxes are in (grounding.py)
        self.pad_token_id = tokenizer.endoftext_id

    def apply_chat_template(
        self,
        messages: Messages,
        add_generation_prompt: bool = True,
        add_vision_id: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        """The prompt text, exactly as the official template (or the checkpoint's) renders it."""
        return render(
            messages,
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
            tools=tools,
            template=self.chat_template,
        )

    def encode(
        self,
        messages: Messages,
        *,
        add_generation_prompt: bool | None = None,
        add_vision_id: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        pixels: bool = True,
    ) -> Encoding:
        """One conversation to ids (+ processed media; only planned when pixels=False)."""
        if add_generation_prompt is None:
            add_generation_prompt = not (messages and messages[-1].get("role") == "assistant")
        ids, items = render_ids(
            messages,
            self.tokenizer,
            add_generation_prompt=add_generation_prompt,
            add_vision_id=add_vision_id,
            tools=tools,
            template=self.chat_template,
        )
        visuals = [self._visual(item.kind, item.part, pixels) for item in items]
        out: list[int] = []
        prev = 0
        for item, vis in zip(items, visuals, strict=True):
            out += ids[prev : item.index] + [ids[item.index]] * vis.tokens
            prev = item.index + 1
        return Encoding(ids=out + ids[prev:], visuals=visuals)

    def _visual(self, kind: str, part: Mapping[str, Any], pixels: bool) -> VisualEncoding:
        merge2 = self.media.merge_size**2
        pixel_values = None
        if pixels:
            result = process_part(dict(part), self.media, access=self.access)
            pixel_values, grid_thw = result
            plan = getattr(result, "plan", None)
        else:
            plan = plan_part(dict(part), self.media, access=self.access)
            grid_thw = plan.grid_thw
        grid = tuple(int(g) for g in grid_thw)
        seconds = None
        if kind == "video":
            seconds = self.media.temporal_patch_size / plan.sample_fps
        return VisualEncoding(kind, part, grid, _prod(grid) // merge2, plan, pixel_values, seconds)

    def __call__(
        self,
        conversations: Messages | Sequence[Messages],
        add_generation_prompt: bool | None = None,
        add_vision_id: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """A conversation, or a list of them, to the model's input tensors (left-padded)."""
        convs = _as_conversations(conversations)
        encs = [
            self.encode(
                c,
                add_generation_prompt=add_generation_prompt,
                add_vision_id=add_vision_id,
                tools=tools,
            )
            for c in convs
        ]
        return self.collate(encs)

    def collate(self, encodings: Sequence[Encoding]) -> dict[str, torch.Tensor]:
        """Left-pad encodings into input_ids/attention_mask; concatenate their media."""
        T = max(len(e.ids) for e in encodings)
        ids = torch.full((len(encodings), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encodings), T), dtype=torch.long)
        for b, e in enumerate(encodings):
            ids[b, T - len(e.ids) :] = torch.tensor(e.ids, dtype=torch.long)
            mask[b, T - len(e.ids) :] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        for kind, pv_key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
            items = [v for e in encodings for v in e.visuals if v.kind == kind]
            if items:
                batch[pv_key] = torch.cat([v.pixel_values for v in items])
                batch[f"{kind}_grid_thw"] = torch.tensor([v.grid_thw for v in items])
                if kind == "video" and self.absolute_time:
                    batch["second_per_grid_ts"] = torch.tensor([v.second_per_grid for v in items])
        return batch

    def plan(
        self,
        messages: Messages,
        *,
        add_generation_prompt: bool | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> TokenPlan:
        """Sizes, grids, tokens, frames and timestamps of every visual item, without pixels."""
        enc = self.encode(
            messages, add_generation_prompt=add_generation_prompt, tools=tools, pixels=False
        )
        visual_tokens = sum(v.tokens for v in enc.visuals)
        return TokenPlan(
            prompt_tokens=len(enc.ids),
            text_tokens=len(enc.ids) - visual_tokens,
            visuals=enc.visuals,
            max_model_len=self.max_model_len,
        )

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def load_processor(path: str | Path | None = None, **kwargs: Any) -> Processor:
    """Tokenizer, chat template and media defaults of a checkpoint directory (or the bundled
    tokenizer and official defaults when ``path`` is None or lacks the files); its config.json,
    when there is one, gives max_model_len and whether videos carry absolute time."""
    tokenizer = Tokenizer.from_dir(path)
    if path is None:
        return Processor(tokenizer, **kwargs)
    media = load_media_config(path)
    cfg = _model_config(Path(path))
    if cfg is not None:
        kwargs.setdefault("max_model_len", cfg.text.max_position_embeddings)
        kwargs.setdefault("absolute_time", cfg.vision.tokens_per_second is not None)
        kwargs.setdefault("model_type", cfg.model_type)
    return Processor(tokenizer, media, load_chat_template(path), **kwargs)


def _model_config(path: Path):
    from qwen2vl.config import Qwen2VLConfig

    if not (path / "config.json").is_file():
        return None
    return Qwen2VLConfig.from_file(path / "config.json")


def _as_conversations(x: Any) -> list[Messages]:
    if not isinstance(x, Sequence) or isinstance(x, (str, bytes)) or not x:
        raise MessageError(
            "expected a conversation (a non-empty list of messages) or a list of them"
        )
    if all(isinstance(m, Mapping) for m in x):
        return [x]
    if all(isinstance(c, Sequence) and not isinstance(c, (str, bytes)) for c in x):
        return list(x)
    raise MessageError("expected a list of message dicts, or a list of such lists")


def _prod(grid: tuple[int, ...]) -> int:
    out = 1
    for g in grid:
        out *= g
    return out
