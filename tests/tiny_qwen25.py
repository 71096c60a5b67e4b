"""Tiny random-weight Qwen2.5-VL models: transformers' (the parity reference) and a checkpoint
directory for command tests (config, safetensors, tokenizer files).

The ViT has 4 blocks, 2 of them full attention, and the released window of 112 px (8x8 patches),
so images of a few dozen patches a side already have several windows, partial ones included.
"""

import shutil

import torch

import qwen2vl
from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl.tokenizer import ASSETS_DIR

TOKENS_PER_SECOND = 2  # as released


def hf_config(tie: bool = False):
    import transformers

    text_config = dict(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
        tie_word_embeddings=tie,
    )
    vision_config = dict(
        depth=4,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        out_hidden_size=64,
        window_size=112,
        fullatt_block_indexes=[1, 3],
        tokens_per_second=TOKENS_PER_SECOND,
    )
    return transformers.Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie
    )


def hf_model(tie: bool = False, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2_5_VLForConditionalGeneration(hf_config(tie)).eval()
    # Random init leaves biases/norms at 0/1; perturb every tensor so no path hides behind them.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def tiny_config() -> Qwen2VLConfig:
    """Our config of the same shape as hf_config (real vocabulary and token ids)."""
    text = TextConfig(
        vocab_size=151936,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[2, 3, 3],
    )
    vision = VisionConfig(
        depth=4,
        embed_dim=32,
        num_heads=4,
        hidden_size=64,
        hidden_act="silu",
        norm="rmsnorm",
        mlp="gated",
        intermediate_size=48,
        window_size=112,
        fullatt_block_indexes=[1, 3],
        tokens_per_second=TOKENS_PER_SECOND,
    )
    return Qwen2VLConfig(text=text, vision=vision, torch_dtype="float32", model_type="qwen2_5_vl")


def tiny_checkpoint(path, seed: int = 0):
    """A tiny Qwen2.5-VL checkpoint directory at path: config.json, model.safetensors and the
    bundled tokenizer files (Qwen2.5-VL ships the Qwen2-VL tokenizer). Never predicts special
    tokens, so generation runs to its token limit."""
    torch.manual_seed(seed)
    model = qwen2vl.Qwen2VL(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.lm_head.weight[151643:] = 0
    qwen2vl.save_pretrained(model, path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS_DIR / name, path / name)
    return path
