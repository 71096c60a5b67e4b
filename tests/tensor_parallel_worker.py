"""What tests/generation/test_tensor_parallel.py runs in each process: under torchrun with
--tensor-parallel-size N, or in the test's own process for N = 1. Saves its results to
OUT/rank{r}.pt.

    torchrun --nproc-per-node 2 tests/tensor_parallel_worker.py SMALL REAL OUT 2
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import qwen2vl
from qwen2vl.config import Qwen2VLConfig, TextConfig, VisionConfig
from qwen2vl.generation import tensor_parallel
from qwen2vl.generation.generate import generate
from qwen2vl.generation.load import load_for_inference
from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.generation.sampling import SamplingParams

IMAGE, VIDEO, VSTART, VEND = 250, 251, 252, 253
PATCH = 3 * 2 * 14 * 14
NEW_TOKENS = 8
SMALL_IDS = dict(
    image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
    vision_end_token_id=VEND, bos_token_id=None, eos_token_id=None,
)  # fmt: skip
LOGIT_STD = 0.3  # of the embedding and lm_head rows: logits of std 0.3 * sqrt(64) = 2.4
PICTURE = "picture.png"  # beside the checkpoints


def config(vocab: int, tie: bool, **ids) -> Qwen2VLConfig:
    """4 query heads and 2 kv heads (divisible by 2 ranks), MLP width 96."""
    text = TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[2, 3, 3],
        tie_word_embeddings=tie,
    )
    vision = VisionConfig(depth=1, embed_dim=16, num_heads=2, hidden_size=64)
    return Qwen2VLConfig(text=text, vision=vision, torch_dtype="float32", **ids)


def write_checkpoints(root: Path) -> tuple[Path, Path]:
    """SMALL: a tied 255-token vocabulary (the last rank's vocabulary shard is padded);
    REAL: the real Qwen2-VL vocabulary, untied, for the Pipeline and its processor."""
    paths = []
    for name, cfg, seed in (
        ("small", config(255, True, **SMALL_IDS), 0),
        ("real", config(151936, False), 1),
    ):
        torch.manual_seed(seed)
        model = qwen2vl.Qwen2VL(cfg).eval()
        init(model)
        if name == "real":
            with torch.no_grad():
                model.lm_head.weight[151643:] = 0  # never a special token
        qwen2vl.save_pretrained(model, root / name)
        paths.append(root / name)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(root / PICTURE)
    return paths[0], paths[1]


def init(model: qwen2vl.Qwen2VL) -> None:
    """Activations of order one (fan-in scaled matrices, norms near one, small biases) and
    logits of a few units: fp32 rounding stays far below the 1e-5 the tests ask for."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                p.normal_(0, LOGIT_STD)
            elif p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5)
            else:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.1 * torch.randn_like(p))


def cases() -> dict[str, dict]:
    """Processor-style batches over the SMALL vocabulary: text, an image, a video, and a
    left-padded batch of two rows with an image each."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 200, (12,), generator=g).tolist()

    def visual(token, grid):
        t, h, w = grid
        return [VSTART] + [token] * (t * h * w // 4) + [VEND]

    def pixels(grids):
        return torch.randn(sum(t * h * w for t, h, w in grids), PATCH, generator=g)

    out = {"text": {"input_ids": torch.tensor([text])}}
    out["image"] = {
        "input_ids": torch.tensor([visual(IMAGE, (1, 4, 6)) + text]),
        "pixel_values": pixels([(1, 4, 6)]),
        "image_grid_thw": torch.tensor([[1, 4, 6]]),
    }
    out["video"] = {
        "input_ids": torch.tensor([text[:4] + visual(VIDEO, (2, 4, 4)) + text]),
        "pixel_values_videos": pixels([(2, 4, 4)]),
        "video_grid_thw": torch.tensor([[2, 4, 4]]),
    }
    rows = [visual(IMAGE, (1, 4, 4)) + text, text[:5] + visual(IMAGE, (1, 2, 4)) + text]
    T = max(map(len, rows))
    out["batch"] = {
        "input_ids": torch.tensor([[0] * (T - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]),
        "pixel_values": pixels([(1, 4, 4), (1, 2, 4)]),
        "image_grid_thw": torch.tensor([[1, 4, 4], [1, 2, 4]]),
    }
    return out


def run(small: Path, real: Path, out: Path, tp: int) -> dict:
    """Every check's raw result in this process, saved to out/rank{r}.pt and returned."""
    res: dict = {"logits": {}, "greedy": {}, "int8": {}}
    model = load_for_inference(small, "float32", tensor_parallel_size=tp)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS)
    for name, batch in cases().items():
        with torch.no_grad():
            res["logits"][name] = model(**batch).logits
        res["greedy"][name] = generate(model, batch, greedy, stop_token_ids=[])
    res["memory"] = tensor_parallel.weight_bytes(model)
    res["process"] = tensor_parallel.process_memory()
    int8 = load_for_inference(small, "float32", quantize="int8", tensor_parallel_size=tp)
    for name, batch in cases().items():
        res["int8"][name] = generate(int8, batch, greedy, stop_token_ids=[])
    pipe = Pipeline.from_pretrained(real, dtype="float32", tensor_parallel_size=tp)
    res["real_memory"] = tensor_parallel.weight_bytes(pipe.model)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(real.parent / PICTURE)},
                {"type": "text", "text": "Hi?"},
            ],
        }
    ]
    res["chat"] = pipe.chat(messages, max_new_tokens=NEW_TOKENS)
    res["chat_again"] = pipe.chat(messages, max_new_tokens=NEW_TOKENS)  # cached prefix + feats
    res["sampled"] = pipe.chat(messages, max_new_tokens=NEW_TOKENS, temperature=1.0)  # no seed
    rank = torch.distributed.get_rank() if tp > 1 else 0
    torch.save(res, out / f"rank{rank}.pt")
    return res


if __name__ == "__main__":
    torch.set_num_threads(1)
    small, real, out, tp = sys.argv[1:]
    run(Path(small), Path(real), Path(out), int(tp))
