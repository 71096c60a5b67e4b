"""The joined model: vision features scattered into the token embeddings, then the Qwen2 decoder.

Letters: B batch, T tokens, E hidden size, V vocabulary.

Module names equal the official checkpoint's (``model.*`` the LLM, ``visual.*`` the ViT,
``lm_head``), so loading is a name match. The model keeps no state between calls: ``forward``
returns the ``rope_deltas`` that a generator needs to place decode tokens, and the caller owns the
cache and the positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.errors import Qwen2VLError
from qwen2vl.model.attention import causal_mask
from qwen2vl.model.rope import mrope_cos_sin, mrope_positions, text_positions
from qwen2vl.model.text import DecoderTaps, KVCache, TextModel
from qwen2vl.model.vision import VisionTransformer

IGNORE_INDEX = -100


@dataclass
class Qwen2VLOutput:
    logits: torch.Tensor | None  # [B, T, V] (or only the positions logits_to_keep names)
    loss: torch.Tensor | None = None  # mean next-token loss over labels != -100
    rope_deltas: torch.Tensor | None = None  # [B]: position of the n-th real token = n + delta
    hidden: torch.Tensor | None = None  # [B, T, E] final hidden states, with return_hidden


class Qwen2VL(nn.Module):
    def __init__(self, cfg: Qwen2VLConfig):
        super().__init__()
        self.cfg = cfg
        self.model = TextModel(cfg.text)
        self.visual = VisionTransformer(cfg.vision)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """With tie_word_embeddings the output projection is the embedding matrix itself."""
        if self.cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def encode_visual(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision features [sum(t*h*w)/M^2, E] of images or videos; cacheable per item."""
        return self.visual(pixels, grid_thw.to(pixels.device))

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
        *,
        token_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, E] with each image/video placeholder replaced by its feature.
        token_embeds [B, T, E]: the embeddings of input_ids when the caller read them already
        (else they are read from the table)."""
        x = self.model.embed_tokens(input_ids) if token_embeds is None else token_embeds
        for token_id, feats, kind in (
            (self.cfg.image_token_id, image_features, "image"),
            (self.cfg.video_token_id, video_features, "video"),
        ):
            slots = input_ids == token_id  # [B, T]
            n_slots = int(slots.sum())
            n_feats = 0 if feats is None else feats.shape[0]
            if n_feats != n_slots:
                raise Qwen2VLError(
                    f"{kind} features and {kind} tokens do not match: {n_feats} features, "
                    f"{n_slots} {kind} tokens in input_ids"
                )
            if n_slots:
                x = x.masked_scatter(slots.unsqueeze(-1), feats.to(x.dtype))
        return x

    def positions(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE position ids [3, B, T] and rope_deltas [B] for a prompt starting at position 0.

        second_per_grid_ts [videos]: seconds per temporal grid step of each video (the
        processor's, from its sampled fps); read only by configs with absolute time
        (vision tokens_per_second), where None means 1.0 each (see ``rope.mrope_positions``)."""
        B, T = input_ids.shape
        if image_grid_thw is None and video_grid_thw is None:
            pos = text_positions(attention_mask, B, T, device=input_ids.device)
            return pos, torch.zeros(B, dtype=torch.long, device=input_ids.device)
        return mrope_positions(
            input_ids,
            image_token_id=self.cfg.image_token_id,
            video_token_id=self.cfg.video_token_id,
            merge=self.cfg.vision.spatial_merge_size,
            attention_mask=attention_mask,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            second_per_grid_ts=second_per_grid_ts,
            tokens_per_second=self.cfg.vision.tokens_per_second,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        *,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_hidden: bool = False,
        taps: DecoderTaps | None = None,
    ) -> Qwen2VLOutput:
        """input_ids [B, T] -> logits [B, T, V].

        attention_mask [B, S]: 1 for real tokens, 0 for padding; S = T, or with a kv_cache the
        whole attended length. second_per_grid_ts [videos]: see ``positions``. position_ids
        [3, B, T] (or [B, T]) override the computed ones and are required when the cache already
        holds tokens. cu_seqlens [S+1] marks packed samples in a
        B = 1 row (training); logits_to_keep > 0 computes logits for the last positions only, a
        1-D tensor of positions for those positions only (training: where the loss is taken, since
        the [T, V] logits of every position cost more than the rest of a small model).
        return_hidden gives the final hidden states of those positions (``hidden``) instead of
        logits, for a caller that applies its own output projection (not with labels).
        inputs_embeds [B, T, E] (from ``embed`` with cached visual features) replaces the
        embedding step; input_ids are still needed for the positions. taps hands out values from
        inside the decoder as they are made (``DecoderTaps``).
        """
        if return_hidden and labels is not None:
            raise Qwen2VLError("labels need logits: not with return_hidden")
        feats = {}
        for kind, pixels, grid in (
            ("image", pixel_values, image_grid_thw),
            ("video", pixel_values_videos, video_grid_thw),
        ):
            if pixels is not None:
                if grid is None:
                    raise Qwen2VLError(f"{kind} pixels were given without their grid_thw")
                feats[kind] = self.encode_visual(pixels, grid)
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, feats.get("image"), feats.get("video"))
        x = inputs_embeds
        B, T = input_ids.shape
        deltas = None
        if position_ids is None:
            position_ids, deltas = self.positions(
                input_ids, attention_mask, image_grid_thw, video_grid_thw, second_per_grid_ts
            )
        elif position_ids.dim() == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        t = self.cfg.text
        cos, sin = mrope_cos_sin(position_ids, t.head_dim, t.rope_theta, t.mrope_section, x.dtype)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = causal_mask(attention_mask, B, T, attention_mask.shape[1], x.device)
        h = self.model(x, cos, sin, mask=mask, cu_seqlens=cu_seqlens, kv_cache=kv_cache, taps=taps)
        if isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep.to(h.device)]
        elif logits_to_keep:
            h = h[:, -logits_to_keep:]
        if return_hidden:
            return Qwen2VLOutput(logits=None, rope_deltas=deltas, hidden=h)
        logits = self.lm_head(h)
        loss = None if labels is None else causal_lm_loss(logits, labels)
        return Qwen2VLOutput(logits=logits, loss=loss, rope_deltas=deltas)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 at t, over labels != -100 (in float32)."""
    logits = logits[:, :-1].float().flatten(0, 1)
    target = labels[:, 1:].flatten().to(logits.device)
    total = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (target != IGNORE_INDEX).sum().clamp(min=1)
