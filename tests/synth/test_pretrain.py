"""Vision pretraining trains the ViT and merger only, learns (its losses fall), and writes a
checkpoint the VLM stages start from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qwen2vl
from qwen2vl.synth.pretrain import PretrainConfig, pretrain_vision
from qwen2vl.train.init import write_initial

ARCH = Path(__file__).parents[2] / "recipes/default/model"


def test_pretrain_vision_trains_the_vit_alone(tmp_path):
    start = write_initial(ARCH, tmp_path / "init", seed=0, std=None, embed_std=0.125)
    cfg = PretrainConfig(
        model=str(start), output=str(tmp_path / "out"), steps=24, batch=3, pool=6, lr=2e-3,
        warmup=5, seed=1, tasks=["shape", "ocr", "video_direction"], log_every=8,
    )  # fmt: skip
    records = pretrain_vision(cfg)
    assert [r["step"] for r in records] == [8, 16, 24]
    # the pool is small: the heads fit it, so the losses fall
    for name in ("colour", "kind", "char_0", "x1_hundreds", "colours"):
        assert records[-1][name] < 0.7 * records[0][name], name

    before, after = qwen2vl.load_model(start), qwen2vl.load_model(cfg.output)
    old = before.state_dict()
    for name, p in after.state_dict().items():
        moved = not torch.equal(p, old[name])
        trainable = name.startswith("visual.")
        assert moved == trainable or (trainable and "norm" in name), name
    lines = (Path(cfg.output) / "vision_pretrain.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["config"]["steps"] == 24
    assert len(lines) == 1 + len(records)
    assert (Path(cfg.output) / "preprocessor_config.json").is_file()


def test_an_empty_run_is_refused_up_front():
    for bad in ({"pool": 0}, {"steps": 0}, {"batch": 0}, {"tasks": []}):
        with pytest.raises(ValueError):
            PretrainConfig(model="m", output="o", **bad)
