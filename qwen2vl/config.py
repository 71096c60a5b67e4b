"""Config dataclasses for Qwen2-VL and Qwen2.5-VL, read from both config.json styles in the wild.

The two families share the LLM and the system (dynamic resolution, M-RoPE, ChatML); the ViT of
Qwen2.5-VL differs in fields of ``VisionConfig`` (``norm``, ``mlp``, ``window_size``,
``fullatt_block_indexes``) and its videos carry absolute time (``tokens_per_second``). The
vision_config key names differ: Qwen2-VL writes the ViT width as ``embed_dim`` and the LLM width
as ``hidden_size``; Qwen2.5-VL writes the ViT width as ``hidden_size`` and the LLM width as
``out_hidden_size``. Ours are ``embed_dim`` and ``hidden_size`` for both.

Two styles exist:
- the official flat one the Qwen releases ship: LLM fields at top level,
  ``rope_scaling: {"type": "mrope", "mrope_section": [16, 24, 24]}``, ``vision_config`` with
  ``embed_dim``, ``depth``, ``num_heads``, ``hidden_size`` (= LLM width), ``in_chans``;
- the nested one transformers >= 5 writes: ``text_config`` and ``vision_config`` sub-dicts,
  ``rope_parameters`` instead of ``rope_scaling``/``rope_theta``, ``in_channels``.

``Qwen2VLConfig.from_hf`` normalises both; ``to_hf`` writes the official flat style of the
config's ``model_type``, which every transformers version (4.45+ / 4.49+ and 5.x) and vLLM read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from qwen2vl.errors import ConfigError

log = logging.getLogger(__name__)

# Keys every Hugging Face config may carry that do not change the architecture.
_GENERIC_KEYS = {
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "output_hidden_states",
    "output_attentions",
    "return_dict",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "problem_type",
    "_name_or_path",
    "model_type",
    "base_config_key",
    "layer_types",
    "sliding_window",
    "max_window_layers",
    "attention_dropout",
    "use_sliding_window",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "vision_token_id",
    "tie_word_embeddings",
    "rope_scaling",
    "rope_parameters",
    "rope_theta",
    "attn_implementation",
    "_attn_implementation_autoset",
    "tokenizer_class",
    "text_config",
    "vision_config",
    "pretraining_tp",
    "quantization_config",
    "num_labels",
}


# How a ViT block normalises and which MLP it runs; the name of each is a VisionConfig value.
NORMS = ("layernorm", "rmsnorm")  # LayerNorm with bias (Qwen2-VL); RMSNorm, weight only (2.5)
MLPS = ("fc", "gated")  # fc1 -> act -> fc2 (Qwen2-VL); down(act(gate(x)) * up(x)) (2.5)
ACTS = ("quick_gelu", "silu")


@dataclass
class VisionConfig:
    """The ViT: Conv3d patch embed, ``depth`` pre-norm blocks, 2x2 patch merger into the LLM width.

    ``window_size`` (pixels, Qwen2.5-VL: 112) makes every block outside ``fullatt_block_indexes``
    attend only inside square windows of that size; None: every block sees the whole image or
    frame. ``tokens_per_second`` (Qwen2.5-VL: 2) puts a video's temporal M-RoPE ids on a time
    axis (see ``rope.mrope_positions``); None: the ids count temporal patches (Qwen2-VL).
    """

    depth: int = 32
    embed_dim: int = 1280
    num_heads: int = 16
    mlp_ratio: int = 4
    hidden_size: int = 3584  # merger output width; must equal the LLM hidden_size
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    hidden_act: str = "quick_gelu"
    rope_theta: float = 10000.0
    norm: str = "layernorm"
    mlp: str = "fc"
    intermediate_size: int | None = None  # MLP width; None: embed_dim * mlp_ratio
    window_size: int | None = None
    fullatt_block_indexes: list[int] = field(default_factory=list)
    tokens_per_second: float | None = None

    def __post_init__(self) -> None:
        _positive(
            self,
            "depth",
            "embed_dim",
            "num_heads",
            "mlp_ratio",
            "hidden_size",
            "in_channels",
            "patch_size",
            "spatial_merge_size",
            "temporal_patch_size",
        )
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"vision_config.embed_dim={self.embed_dim} is not divisible by "
                f"vision_config.num_heads={self.num_heads}"
            )
        if self.head_dim % 4:
            raise ConfigError(
                f"vision head_dim={self.head_dim} must be a multiple of 4 (2D rotary)"
            )
        for name, allowed in (("hidden_act", ACTS), ("norm", NORMS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"vision_config.{name}={getattr(self, name)!r} is not supported "
                    f"(one of {', '.join(map(repr, allowed))})"
                )
        if self.intermediate_size is not None:
            _positive(self, "intermediate_size")
        self._check_windows()
        if self.tokens_per_second is not None and not self.tokens_per_second > 0:
            raise ConfigError(
                f"vision_config.tokens_per_second={self.tokens_per_second!r} must be positive"
            )

    def _check_windows(self) -> None:
        self.fullatt_block_indexes = [int(i) for i in self.fullatt_block_indexes]
        if self.window_size is None:
            return
        unit = self.patch_size * self.spatial_merge_size
        if (
            not isinstance(self.window_size, int)
            or self.window_size % unit
            or self.window_size <= 0
        ):
            raise ConfigError(
                f"vision_config.window_size={self.window_size!r} must be a positive multiple of "
                f"patch_size * spatial_merge_size = {unit} pixels"
            )
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ConfigError(
                f"vision_config.fullatt_block_indexes={self.fullatt_block_indexes}: {bad} are "
                f"not blocks of a depth-{self.depth} ViT"
            )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return self.intermediate_size or int(self.embed_dim * self.mlp_ratio)

    @property
    def window_units(self) -> int | None:
        """Side of an attention window in merged units (112 px / 28 px = 4), or None."""
        if self.window_size is None:
            return None
        return self.window_size // (self.patch_size * self.spatial_merge_size)


@dataclass
class TextConfig:
    """The Qwen2 decoder with M-RoPE."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list[int] = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 32768
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        self.mrope_section = [int(s) for s in self.mrope_section]
        if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
            raise ConfigError(
                f"mrope_section={self.mrope_section} must have 3 entries summing to "
                f"head_dim/2={self.head_dim // 2}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not supported (Qwen2 uses 'silu')"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class Qwen2VLConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    torch_dtype: str = "bfloat16"
    model_type: str = "qwen2_vl"  # the config.json family to_hf writes (see FAMILIES)

    def __post_init__(self) -> None:
        self._check_family()
        if self.vision.hidden_size != self.text.hidden_size:
            raise ConfigError(
                f"vision_config.hidden_size={self.vision.hidden_size} must equal the "
                f"LLM hidden_size={self.text.hidden_size} (the merger projects into it)"
            )
        for name in (
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
        ):
            value = getattr(self, name)
            if not 0 <= value < self.text.vocab_size:
                raise ConfigError(
                    f"{name}={value} is outside the vocabulary (vocab_size={self.text.vocab_size})"
                )

    def _check_family(self) -> None:
        """Each family's config.json describes only its own ViT; refuse what to_hf cannot write."""
        if self.model_type not in FAMILIES:
            raise ConfigError(
                f"model_type={self.model_type!r}: this is not a Qwen2-VL or Qwen2.5-VL "
                f"checkpoint (expected one of {', '.join(map(repr, FAMILIES))})"
            )
        for name, want in FAMILIES[self.model_type].vision.items():
            got = getattr(self.vision, name)
            if want is _SET and got is None or want is not _SET and got != want:
                raise ConfigError(
                    f"vision_config.{name}={got!r} does not fit model_type={self.model_type!r} "
                    f"(which needs {'a value' if want is _SET else repr(want)})"
                )

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Qwen2VLConfig:
        """Build from a config.json dict in either the official flat or the transformers-5 style."""
        model_type = d.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(
                f"model_type={model_type!r}: this is not a Qwen2-VL or Qwen2.5-VL checkpoint "
                f"(expected one of {', '.join(map(repr, FAMILIES))})"
            )
        top = {k: v for k, v in d.items() if k not in ("text_config", "vision_config")}
        text = {**top, **(d.get("text_config") or {})}
        kwargs = {
            k: d[k]
            for k in (
                "image_token_id",
                "video_token_id",
                "vision_start_token_id",
                "vision_end_token_id",
            )
            if k in d
        }
        for key in ("bos_token_id", "eos_token_id"):
            if key in text:
                kwargs[key] = text[key]
        dtype = d.get("torch_dtype") or d.get("dtype") or text.get("dtype") or "bfloat16"
        return cls(
            text=_text_from_hf(text),
            vision=_vision_from_hf(d.get("vision_config") or {}, FAMILIES[model_type]),
            torch_dtype=str(dtype).removeprefix("torch."),
            model_type=model_type,
            **kwargs,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> Qwen2VLConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no config.json") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf(d)

    def to_hf(self) -> dict[str, Any]:
        """The official flat config.json style of this config's model_type."""
        t, family = self.text, FAMILIES[self.model_type]
        return {
            "architectures": [family.architecture],
            "model_type": self.model_type,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": self.vision_start_token_id + 2,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "sliding_window": t.max_position_embeddings,
            "tie_word_embeddings": t.tie_word_embeddings,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vision_config": family.vision_to_hf(self.vision),
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "vocab_size": t.vocab_size,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_from_hf(d: dict[str, Any]) -> TextConfig:
    if d.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported (no Qwen2-VL release uses it)")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "mrope"))
    if rope_type not in ("mrope", "default"):
        raise ConfigError(f"rope_scaling.type={rope_type!r} is not supported (expected 'mrope')")
    if "mrope_section" not in rope:
        raise ConfigError("rope_scaling.mrope_section is missing (Qwen2-VL needs M-RoPE sections)")
    names = {f.name for f in fields(TextConfig)} - {"mrope_section", "rope_theta"}
    kwargs = {k: d[k] for k in names if k in d}
    kwargs["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 1000000.0))
    kwargs["mrope_section"] = rope["mrope_section"]
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = d.get("num_attention_heads", TextConfig.num_attention_heads)
    _warn_unknown(
        d,
        "text_config",
        names
        | {"image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"},
    )
    return _build(TextConfig, kwargs, "text_config")


def _vision_from_hf(d: dict[str, Any], family: Family) -> VisionConfig:
    d = dict(d)
    if "in_chans" in d:
        d.setdefault("in_channels", d.pop("in_chans"))
    d = {family.names.get(k, k): v for k, v in d.items()}
    # Older Qwen2-VL configs wrote the merger width under both names; 'hidden_size' is the one
    # models read.
    names = {f.name for f in fields(VisionConfig)} - {"rope_theta"}
    kwargs = {**family.defaults, **{k: d[k] for k in names if k in d}}
    rope = d.get("rope_parameters") or {}
    if "rope_theta" in rope:
        kwargs["rope_theta"] = rope["rope_theta"]
    for key in ("patch_size", "temporal_patch_size"):
        if isinstance(kwargs.get(key), (list, tuple)):
            raise ConfigError(f"vision_config.{key}={kwargs[key]} must be a single integer")
    known = names | {"num_attention_heads", "num_hidden_layers"} | family.ignored
    _warn_unknown(d, "vision_config", known)
    return _build(VisionConfig, kwargs, "vision_config")


def _qwen2_vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    return {
        "depth": v.depth,
        "embed_dim": v.embed_dim,
        "mlp_ratio": v.mlp_ratio,
        "num_heads": v.num_heads,
        "in_chans": v.in_channels,
        "hidden_size": v.hidden_size,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "hidden_act": v.hidden_act,
    }


def _qwen25_vision_to_hf(v: VisionConfig) -> dict[str, Any]:
    return {
        "depth": v.depth,
        "hidden_act": v.hidden_act,
        "hidden_size": v.embed_dim,
        "intermediate_size": v.mlp_dim,
        "num_heads": v.num_heads,
        "in_chans": v.in_channels,
        "in_channels": v.in_channels,  # the name transformers reads; in_chans the release's
        "out_hidden_size": v.hidden_size,
        "patch_size": v.patch_size,
        "spatial_patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
        "window_size": v.window_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes),
        "tokens_per_second": v.tokens_per_second,
    }


_SET = object()  # in Family.vision: the field must have a value (not None)


@dataclass(frozen=True)
class Family:
    """What one model_type's config.json says about the ViT and how it names it."""

    architecture: str  # the transformers class in "architectures"
    vision: dict[str, Any]  # VisionConfig values this family always has
    names: dict[str, str]  # vision_config key -> our VisionConfig field, where they differ
    defaults: dict[str, Any]  # VisionConfig values for keys a config.json leaves out
    ignored: frozenset[str]  # vision_config keys that describe nothing we build
    vision_to_hf: Callable[[VisionConfig], dict[str, Any]]


FAMILIES = {
    "qwen2_vl": Family(
        architecture="Qwen2VLForConditionalGeneration",
        vision=dict(
            norm="layernorm",
            mlp="fc",
            intermediate_size=None,
            window_size=None,
            fullatt_block_indexes=[],
            tokens_per_second=None,
        ),
        names={},
        defaults={},
        ignored=frozenset(),
        vision_to_hf=_qwen2_vision_to_hf,
    ),
    # Defaults: transformers' Qwen2_5_VLVisionConfig (releases always write these keys).
    "qwen2_5_vl": Family(
        architecture="Qwen2_5_VLForConditionalGeneration",
        vision=dict(norm="rmsnorm", mlp="gated", window_size=_SET, tokens_per_second=_SET),
        names={"hidden_size": "embed_dim", "out_hidden_size": "hidden_size"},
        defaults=dict(
            norm="rmsnorm",
            mlp="gated",
            hidden_act="silu",
            intermediate_size=3420,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
            tokens_per_second=4,
        ),
        ignored=frozenset({"spatial_patch_size"}),
        vision_to_hf=_qwen25_vision_to_hf,
    ),
}


def _build(cls: type, kwargs: dict[str, Any], where: str):
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a string where a number belongs
        raise ConfigError(f"{where}: {e}") from e


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name}={value!r} must be a positive integer")


def _warn_unknown(d: dict[str, Any], where: str, known: set[str]) -> None:
    unknown = sorted(set(d) - known - _GENERIC_KEYS)
    if unknown:
        log.warning("%s: ignoring unknown keys %s", where, unknown)
