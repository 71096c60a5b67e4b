"""The released checkpoints' architectures, as configs: `preset("7B")`, `preset("2.5-32B")`.

Used where a size matters without its weights: random-weight benchmarks, the memory plan, tests.
"""

from __future__ import annotations

from qwen2vl.config import FAMILIES, ConfigError, Qwen2VLConfig, TextConfig, VisionConfig


def _preset(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool
) -> Qwen2VLConfig:
    return Qwen2VLConfig(
        text=_preset_text(hidden, inter, layers, heads, kv, vocab, tie),
        vision=VisionConfig(hidden_size=hidden),
    )


def _preset25(
    hidden: int, inter: int, layers: int, heads: int, kv: int, vocab: int, tie: bool
) -> Qwen2VLConfig:
    # The family's defaults (transformers' Qwen2_5_VLVisionConfig), but 2 tokens per second as
    # every release's config.json writes.
    defaults = FAMILIES["qwen2_5_vl"].defaults | {"tokens_per_second": 2}
    vision = VisionConfig(hidden_size=hidden, **defaults)
    text = _preset_text(hidden, inter, layers, heads, kv, vocab, tie, max_len=128000)
    return Qwen2VLConfig(text=text, vision=vision, model_type="qwen2_5_vl")


def _preset_text(
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv: int,
    vocab: int,
    tie: bool,
    max_len: int = 32768,
) -> TextConfig:
    return TextConfig(
        max_position_embeddings=max_len,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        tie_word_embeddings=tie,
    )


# The released checkpoints' architectures (Qwen/Qwen2-VL-{2B,7B,72B}-Instruct and
# Qwen/Qwen2.5-VL-{3B,7B,32B,72B}-Instruct config.json).
PRESETS = {
    "2B": lambda: _preset(1536, 8960, 28, 12, 2, 151936, tie=True),
    "7B": lambda: _preset(3584, 18944, 28, 28, 4, 152064, tie=False),
    "72B": lambda: _preset(8192, 29568, 80, 64, 8, 152064, tie=False),
    "2.5-3B": lambda: _preset25(2048, 11008, 36, 16, 2, 151936, tie=True),
    "2.5-7B": lambda: _preset25(3584, 18944, 28, 28, 4, 152064, tie=False),
    "2.5-32B": lambda: _preset25(5120, 27648, 64, 40, 8, 152064, tie=False),
    "2.5-72B": lambda: _preset25(8192, 29568, 80, 64, 8, 152064, tie=False),
}


def preset(name: str) -> Qwen2VLConfig:
    """The config of an official release: '2B', '7B', '72B' (Qwen2-VL) or '2.5-3B', '2.5-7B',
    '2.5-32B', '2.5-72B' (Qwen2.5-VL)."""
    try:
        return PRESETS[name.upper()]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
