"""Fixtures and helpers of the tests that train (tests/train, tests/synth): tiny checkpoints,
generated images and JSONL data. A conftest imports the fixtures it offers from here."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_qwen2vl import tiny_config

import qwen2vl
from qwen2vl.config import Qwen2VLConfig
from qwen2vl.processor import VisualEncoding
from qwen2vl.train import Sample, TrainConfig, train
from qwen2vl.train.metrics import read_metrics

# Vision special ids of the 64-token model used where no tokenizer is needed.
IMAGE, VIDEO, VSTART, VEND = 60, 61, 62, 63
PATCH = 3 * 2 * 14 * 14


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run several times faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A tiny model over the real vocabulary with tied embeddings (as the 2B release), on disk
    without tokenizer files (the processor falls back to the bundled tokenizer)."""
    torch.manual_seed(0)
    model = qwen2vl.Qwen2VL(tiny_config(tie=True, real_vocab=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    path = tmp_path_factory.mktemp("tiny_ckpt")
    qwen2vl.save_pretrained(model, path)
    return path


def write_image(path, size, seed):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).save(path)


def conversation(image: str | None, question: str, answer: str) -> list[dict]:
    content = [{"type": "text", "text": question}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]


SIZES = [(56, 56), (84, 56), (56, 112), (112, 84)]


def write_dataset(root, n: int = 8, lines: list[str] | None = None, name: str = "train.jsonl"):
    """A JSONL file in `root` with n image conversations of several resolutions (images in
    root/img, referenced relative to the file), then the raw `lines`; returns its path."""
    (root / "img").mkdir(exist_ok=True)
    out = []
    for i in range(n):
        write_image(root / "img" / f"{i}.png", SIZES[i % len(SIZES)], i)
        messages = conversation(f"img/{i}.png", f"What is picture {i}?", f"Number {i}.")
        out.append(json.dumps({"messages": messages}))
    path = root / name
    path.write_text("\n".join(out + (lines or [])) + "\n")
    return path


@pytest.fixture
def make_data(tmp_path):
    """make_data(n, lines=None) -> write_dataset in this test's tmp_path."""

    def make(n: int = 8, lines: list[str] | None = None, name: str = "train.jsonl"):
        return write_dataset(tmp_path, n, lines, name)

    return make


def vocab64_config() -> Qwen2VLConfig:
    """The tiny test model with 64 tokens: few enough output rows in 32 dimensions that every
    token can be made the argmax with a wide margin (with 256, some rows cannot, and a frozen
    head then caps how low stage 1 can go)."""
    cfg = tiny_config()
    return dataclasses.replace(
        cfg,
        text=dataclasses.replace(cfg.text, vocab_size=64),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )


def vocab64_model(seed: int = 0) -> qwen2vl.Qwen2VL:
    torch.manual_seed(seed)
    model = qwen2vl.Qwen2VL(vocab64_config())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        model.lm_head.weight.mul_(2)  # a confident head, as a trained model's
    return model


def synthetic_samples(n: int = 8, seed: int = 0, grids=((1, 4, 4), (1, 4, 8))) -> list[Sample]:
    """Image conversations in the 64-token vocabulary: the same prompt, a different image and
    answer each, so only the image tells the answer."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        grid = grids[i % len(grids)]
        patches = grid[0] * grid[1] * grid[2]
        pixels = torch.randn(patches, PATCH, generator=g)
        answer = torch.randint(10, 56, (2,), generator=g).tolist()
        ids = [1, 5, 6, VSTART] + [IMAGE] * (patches // 4) + [VEND, 7, 8, 2] + answer + [3]
        labels = [-100] * (len(ids) - 3) + answer + [3]
        visual = VisualEncoding("image", {}, grid, patches // 4, None, pixels)
        samples.append(Sample(ids, labels, [visual]))
    return samples


@pytest.fixture
def tiny64():
    """Helpers for the 64-token model: .model(seed), .samples(n, seed, grids), .config()."""
    import types

    return types.SimpleNamespace(
        model=vocab64_model,
        samples=synthetic_samples,
        config=vocab64_config,
        IMAGE=IMAGE,
        VSTART=VSTART,
        VEND=VEND,
    )


def picture(width=112, height=56, box=(56, 0, 84, 28), seed=0):
    """Dark noise with a bright square filling `box` (pixels x0, y0, x1, y1, end exclusive)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
    x0, y0, x1, y1 = box
    array[y0:y1, x0:x1] = (230, 30, 30)
    return Image.fromarray(array)


def write_grounding(root, n):
    """n one-object pictures whose answers box the bright square, at several places."""
    lines = []
    for i in range(n):
        cell = i % 8
        col, row = cell % 4, cell // 4
        box = (28 * col, 28 * row, 28 * col + 28, 28 * row + 28)
        picture(box=box, seed=i).save(root / f"g{i}.png")
        x0, y0, x1, y1 = (round(1000 * v / s) for v, s in zip(box, (112, 56, 112, 56), strict=True))
        answer = (f"<|object_ref_start|>red square<|object_ref_end|>"
                  f"<|box_start|>({x0},{y0}),({x1},{y1})<|box_end|>")  # fmt: skip
        lines.append(json.dumps({"messages": conversation(f"g{i}.png", "Where is it?", answer)}))
    path = root / "grounding.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def train_briefly(tiny_ckpt, data, out, *, objectives=(), **options):
    """40 steps at a high rate on `data` (with `objectives`): the result and the metrics
    records."""
    cfg = TrainConfig(model=str(tiny_ckpt), data=str(data), output=str(out), max_steps=40,
                      lr=1e-2, warmup_steps=2, max_tokens=256, **options)  # fmt: skip
    result = train(cfg, objectives=objectives)
    return result, read_metrics(out / "metrics.jsonl")


@pytest.fixture(scope="session")
def helpers():
    """Image, conversation and dataset writers for tests that build their own files."""
    import types

    return types.SimpleNamespace(
        write_image=write_image,
        conversation=conversation,
        write_dataset=write_dataset,
        picture=picture,
        write_grounding=write_grounding,
        train_briefly=train_briefly,
    )
