"""The Processor (messages in, batch out) against transformers tokenizer + image processor."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image

from qwen2vl.errors import MediaError, MessageError
from qwen2vl.processor import load_processor
from qwen2vl.tokenizer import ASSETS_DIR

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def proc():
    return load_processor()


def image(path: Path, w: int, h: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return str(path)


def conversation(tmp_path):
    a, b = image(tmp_path / "a.png", 200, 100, 0), image(tmp_path / "b.png", 90, 300, 1)
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": a},
                {"type": "text", "text": "Compare with"},
                {"type": "image", "image": f"file://{b}", "max_pixels": 20000},
            ],
        },
    ], [a, b]


def test_batch_equals_transformers_tokenizer_and_image_processor(proc, tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    messages, paths = conversation(tmp_path)
    batch = proc(messages)
    # Reference: the official template (Jinja), each pad expanded to grid.prod()/4 pads as
    # transformers' Qwen2VLProcessor does, tokenized by transformers' tokenizer on our files.
    template = (FIXTURES / "qwen2vl_chat_template.jinja").read_text()
    text = (
        ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        .from_string(template)
        .render(messages=messages, add_generation_prompt=True)
    )
    grids, pixels = [], []
    for path, max_pixels in zip(paths, [28 * 28 * 1280, 20000], strict=True):
        ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
        out = ip(images=[Image.open(path)], return_tensors="pt")
        grids.append(out["image_grid_thw"][0])
        pixels.append(out["pixel_values"])
    for grid in grids:
        text = text.replace("<|image_pad|>", "<|placeholder|>" * int(grid.prod() // 4), 1)
    text = text.replace("<|placeholder|>", "<|image_pad|>")
    tok = transformers.AutoTokenizer.from_pretrained(ASSETS_DIR)
    assert batch["input_ids"][0].tolist() == tok(text)["input_ids"]
    assert torch.equal(batch["image_grid_thw"], torch.stack(grids))
    assert (batch["pixel_values"] - torch.cat(pixels)).abs().max() <= 1e-5


def test_plan_is_exact_and_needs_no_pixels(proc, tmp_path):
    messages, _ = conversation(tmp_path)
    plan = proc.plan(messages)
    batch = proc(messages)
    assert plan.prompt_tokens == batch["input_ids"].shape[1]
    assert [v.grid_thw for v in plan.visuals] == [
        tuple(g) for g in batch["image_grid_thw"].tolist()
    ]
    assert all(v.pixel_values is None for v in plan.visuals)
    assert plan.text_tokens == plan.prompt_tokens - sum(v.tokens for v in plan.visuals)
    assert plan.visuals[0].plan.resized_height == 112 and plan.visuals[0].plan.width == 200


def test_video_plan_matches_batch(proc, tmp_path):
    frames = [Image.new("RGB", (64, 48), (i * 8, 0, 0)) for i in range(8)]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": frames, "sample_fps": 2},
                {"type": "text", "text": "What moves?"},
            ],
        }
    ]
    batch = proc(messages)
    plan = proc.plan(messages)
    t, h, w = batch["video_grid_thw"][0].tolist()
    assert t == 4 and plan.visuals[0].grid_thw == (t, h, w)
    assert (batch["input_ids"] == proc.tokenizer.video_pad_id).sum() == t * h * w // 4
    assert batch["pixel_values_videos"].shape == (t * h * w, 1176)


def test_batches_are_left_padded(proc, tmp_path):
    messages, _ = conversation(tmp_path)
    short = [{"role": "user", "content": "Hi"}]
    batch = proc([short, messages])
    mask = batch["attention_mask"]
    assert mask[1].all() and not mask[0].all()
    n_pad = int((mask[0] == 0).sum())
    assert (batch["input_ids"][0, :n_pad] == proc.pad_token_id).all()
    assert batch["input_ids"][0, n_pad:].tolist() == proc(short)["input_ids"][0].tolist()


def test_generation_prompt_defaults_to_unless_assistant_last(proc):
    user = [{"role": "user", "content": "Hi"}]
    done = user + [{"role": "assistant", "content": "Hello."}]
    tail = proc.decode(proc(user)["input_ids"][0], skip_special_tokens=False)
    assert tail.endswith("<|im_start|>assistant\n")
    tail = proc.decode(proc(done)["input_ids"][0], skip_special_tokens=False)
    assert tail.endswith("Hello.<|im_end|>\n")


def test_typed_special_tokens_stay_text(proc):
    ids = proc([{"role": "user", "content": "<|image_pad|><|im_start|>system"}])["input_ids"][0]
    assert proc.tokenizer.image_pad_id not in ids.tolist()
    assert ids.tolist().count(proc.tokenizer.im_start_id) == 3  # system, user, assistant


@pytest.mark.parametrize(
    "bad, error",
    [
        ([], MessageError),
        ([{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]}], MessageError),
        ([{"role": "user", "content": [{"type": "image"}]}], MessageError),
        ([{"role": "system", "content": [{"type": "image", "image": "x.png"}]}], MessageError),
        (
            [{"role": "user", "content": [{"type": "image", "image": "/no/such/file.png"}]}],
            MediaError,
        ),
    ],
)
def test_malformed_messages_are_clear_errors(proc, bad, error):
    with pytest.raises(error):
        proc(bad)


def video_messages(sample_fps: float) -> list:
    frames = [Image.new("RGB", (64, 48), (i * 8, 0, 0)) for i in range(8)]
    part = {"type": "video", "video": frames, "sample_fps": sample_fps}
    return [{"role": "user", "content": [part, {"type": "text", "text": "What moves?"}]}]


def test_qwen25_batches_carry_seconds_per_grid_of_each_video(tmp_path):
    from tiny_qwen25 import tiny_config

    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf()))
    proc = load_processor(tmp_path)
    assert proc.absolute_time
    batch = proc([video_messages(2), video_messages(4)])
    # temporal_patch_size 2 / sampled fps, per video in batch order
    assert batch["second_per_grid_ts"].tolist() == [1.0, 0.5]
    assert [v.second_per_grid for v in proc.plan(video_messages(4)).visuals] == [0.5]


def test_qwen2vl_batches_have_no_seconds_per_grid(tmp_path):
    from tiny_qwen2vl import tiny_config

    (tmp_path / "config.json").write_text(json.dumps(tiny_config(real_vocab=True).to_hf()))
    proc = load_processor(tmp_path)
    assert not proc.absolute_time
    assert "second_per_grid_ts" not in proc(video_messages(4))


def test_position_inputs_of_an_encoding_give_the_model_its_positions(tmp_path):
    from tiny_qwen25 import tiny_config

    import qwen2vl
    from qwen2vl.processor import position_inputs

    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_hf()))
    proc = load_processor(tmp_path)
    messages = video_messages(1)  # 2 s per grid step: temporal ids 4 apart (tokens_per_second 2)
    messages[0]["content"].insert(0, {"type": "image", "image": Image.new("RGB", (56, 56))})
    enc = proc.encode(messages)
    batch = proc(messages)
    kwargs = position_inputs(enc.visuals)
    assert torch.equal(kwargs["image_grid_thw"], batch["image_grid_thw"])
    assert torch.equal(kwargs["video_grid_thw"], batch["video_grid_thw"])
    assert torch.equal(kwargs["second_per_grid_ts"], batch["second_per_grid_ts"])
    model = qwen2vl.Qwen2VL(tiny_config())
    ids = torch.tensor([enc.ids])
    pos, _ = model.positions(ids, None, **kwargs)
    times = sorted(set(pos[0, 0, ids[0] == proc.tokenizer.video_pad_id].tolist()))
    assert [t - times[0] for t in times] == [0, 4, 8, 12]
    assert position_inputs([])["video_grid_thw"] is None
