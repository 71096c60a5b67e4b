"""A tiny qwen2vl model with its own small vocabulary, for tests that need no reference."""

import torch

import qwen2vl
from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig

IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253


def tiny_config(tie: bool = False, real_vocab: bool = False) -> Qwen2VLConfig:
    """Hidden 32, 2 LLM layers, 1 ViT block; a 256-token vocabulary with our own special ids, or
    (real_vocab) the real Qwen2-VL vocabulary size and ids."""
    text = TextConfig(
        vocab_size=151936 if real_vocab else 256,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        mrope_section=[2, 3, 3],
        tie_word_embeddings=tie,
    )
    vision = VisionConfig(depth=1, embed_dim=16, num_heads=2, hidden_size=32)
    ids = (
        {}
        if real_vocab
        else dict(
            image_token_id=IMAGE,
            video_token_id=VIDEO,
            vision_start_token_id=VSTART,
            vision_end_token_id=VEND,
        )
    )
    return Qwen2VLConfig(text=text, vision=vision, torch_dtype="float32", **ids)


def tiny_model(seed: int = 0, tie: bool = False) -> qwen2vl.Qwen2VL:
    torch.manual_seed(seed)
    model = qwen2vl.Qwen2VL(tiny_config(tie)).eval()
    with torch.no_grad():  # larger weights so logits are peaked enough to be interesting
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if not tie:  # like a trained model, never predict the vision special tokens
            model.lm_head.weight[VSTART - 3 :] = 0
    return model


def tiny_real_vocab_checkpoint(path, seed: int = 0):
    """A tiny model over the real Qwen2-VL vocabulary and token ids, saved to path (no tokenizer
    files: the processor falls back to the bundled tokenizer). Never predicts special tokens."""
    cfg = tiny_config(real_vocab=True)
    torch.manual_seed(seed)
    model = qwen2vl.Qwen2VL(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.lm_head.weight[151643:] = 0
    qwen2vl.save_pretrained(model, path)
    return path
