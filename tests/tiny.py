"""Tiny random-weight Qwen2-VL models made by transformers: the reference in parity tests."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

IMAGE, VIDEO, VSTART, VEND = 151655, 151656, 151652, 151653
PATCH = 3 * 2 * 14 * 14


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


def visual(token, grid):
    t, h, w = grid
    return [VSTART] + [token] * (t * h * w // 4) + [VEND]


def prompt(*parts):
    """Text ids and visual items -> (ids, image grids, video grids)."""
    ids, images, videos = [151644, 872, 198], [], []
    for kind, value in parts:
        if kind == "text":
            ids += value
        else:
            ids += visual(IMAGE if kind == "image" else VIDEO, value)
            (images if kind == "image" else videos).append(value)
    return ids + [151645, 198, 151644, 77091, 198], images, videos


def batch(*prompts):
    """Left-pad several prompts; random pixels for every visual item."""
    g = torch.Generator().manual_seed(0)
    T = max(len(p[0]) for p in prompts)
    ids = torch.tensor([[151643] * (T - len(p[0])) + p[0] for p in prompts])
    mask = torch.tensor([[0] * (T - len(p[0])) + [1] * len(p[0]) for p in prompts])
    out = {"input_ids": ids, "attention_mask": mask}
    for key, grids in (
        ("image", [g_ for p in prompts for g_ in p[1]]),
        ("video", [g_ for p in prompts for g_ in p[2]]),
    ):
        if grids:
            n = sum(t * h * w for t, h, w in grids)
            pv = "pixel_values" if key == "image" else "pixel_values_videos"
            out[pv] = torch.randn(n, PATCH, generator=g)
            out[f"{key}_grid_thw"] = torch.tensor(grids)
    return out


TEXT = ("text", [40, 1079, 264, 8251, 13, 3555, 374, 279, 6722, 30])
CASES = {
    "text_only": [prompt(TEXT)],
    "one_image": [prompt(("image", (1, 8, 12)), TEXT)],
    "two_images_different_shapes": [prompt(("image", (1, 4, 16)), TEXT, ("image", (1, 10, 6)))],
    "one_video": [prompt(("video", (3, 8, 12)), TEXT)],
    "image_and_video": [prompt(("image", (1, 6, 6)), ("video", (2, 4, 8)), TEXT)],
    "left_padded_batch": [
        prompt(("image", (1, 4, 4)), TEXT),
        prompt(TEXT, ("image", (1, 8, 10)), ("text", [11, 12, 13])),
    ],
}


STOP = [151645, 151643]


def reference(hf, inputs, n):
    """transformers' greedy generate: the new ids of each row, cut after the first stop id."""
    ids = inputs["input_ids"]
    extra = {"mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int()}
    with torch.no_grad():
        out = hf.generate(
            **inputs,
            **extra,
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=STOP,
            pad_token_id=151643,
        )
    rows = []
    for row in out[:, ids.shape[1] :].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in STOP), len(row))
        rows.append(row[:cut])
    return rows
