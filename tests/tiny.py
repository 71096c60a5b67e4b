"""Tiny random-weight Qwen2-VL models made by transformers: the reference in parity tests."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, VSTART, VEND = 151655, 151656, 151652, 151653


def hf_config(tie: bool = False, **text):
    text_config = (
        dict(
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
        | text
    )
    vision_config = dict(depth=2, embed_dim=32, num_heads=4, hidden_size=64)
    return transformers.Qwen2VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=tie
    )


def hf_model(tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.Qwen2VLForConditionalGeneration(hf_config(tie)).eval()
    # Random init leaves biases/norms at 0/1; perturb every tensor so no path hides behind them.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
