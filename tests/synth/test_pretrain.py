"""Vision pretraining trains the ViT and merger only, learns (its losses fall), and writes a
checkpoint the VLM stages start from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qwen2vl
from qwen2vl.synth.pretrain import PretrainConfig, pool_plan, pretrain_vision
from qwen2vl.train.init import write_initial

ARCH = Path(__file__).parents[2] / "qwen2vl/synth/recipe/model"


def test_pretrain_vision_trains_the_vit_alone(tmp_path):
    start = write_initial(ARCH, tmp_path / "init", seed=0, std=None, embed_std=0.125)
    cfg = PretrainConfig(
        model=str(start), output=str(tmp_path / "out"), steps=48, batch=3, pool=6, lr=2e-3,
        warmup=5, seed=1, tasks=["shape", "ocr", "video_direction"], log_every=16,
    )  # fmt: skip
    records = pretrain_vision(cfg)
    assert [r["step"] for r in records] == [16, 32, 48]
    # the pool is small: the heads fit it, so the losses fall (the box, relative to tiny
    # objects' sides, more slowly)
    for name in ("colour", "kind", "char_0", "x1_hundreds", "colours"):
        assert records[-1][name] < 0.7 * records[0][name], name
    assert records[-1]["box"] < 0.85 * records[0]["box"]

    before, after = qwen2vl.load_model(start), qwen2vl.load_model(cfg.output)
    old = before.state_dict()
    for name, p in after.state_dict().items():
        moved = not torch.equal(p, old[name])
        trainable = name.startswith("visual.")
        assert moved == trainable or (trainable and "norm" in name), name
    lines = (Path(cfg.output) / "vision_pretrain.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["config"]["steps"] == 48
    assert len(lines) == 1 + len(records)
    assert (Path(cfg.output) / "preprocessor_config.json").is_file()


def test_an_empty_run_is_refused_up_front():
    for bad in ({"pool": 0}, {"steps": 0}, {"batch": 0}, {"tasks": []}):
        with pytest.raises(ValueError):
            PretrainConfig(model="m", output="o", **bad)


def test_equal_weights_take_the_tasks_in_turn():
    cfg = PretrainConfig(model="m", output="o", pool=7, tasks=["shape", "ocr", "count"])
    assert pool_plan(cfg) == [
        ("shape", 0), ("ocr", 0), ("count", 0), ("shape", 1), ("ocr", 1), ("count", 1),
        ("shape", 2),
    ]  # fmt: skip
    same = PretrainConfig(model="m", output="o", pool=7, tasks=["shape", "ocr", "count"],
                          task_weights={"shape": 2.5, "ocr": 2.5, "count": 2.5})  # fmt: skip
    assert pool_plan(same) == pool_plan(cfg)


def test_task_weights_set_each_tasks_share_of_the_pool():
    cfg = PretrainConfig(
        model="m", output="o", pool=600, tasks=["shape", "video_direction", "ocr"],
        task_weights={"video_direction": 0.5, "ocr": 0},
    )  # fmt: skip
    plan = pool_plan(cfg)
    shape = [i for t, i in plan if t == "shape"]
    video = [i for t, i in plan if t == "video_direction"]
    assert (len(shape), len(video)) == (400, 200) and "ocr" not in {t for t, _ in plan}
    assert shape == list(range(400)) and video == list(range(200))  # each task's own samples
    # spread through the pool, not in blocks: every 3 scenes hold 2 shapes and 1 video
    assert all(plan[k][0] == "video_direction" for k in range(1, 600, 3))


@pytest.mark.parametrize(
    "weights",
    [{"compare": 1.0}, {"shape": -1.0}, {"shape": float("nan")}, {"shape": float("inf")},
     {"shape": 0.0, "ocr": 0.0}],
)  # fmt: skip
def test_bad_task_weights_are_refused(weights):
    with pytest.raises(ValueError, match="task"):
        PretrainConfig(model="m", output="o", tasks=["shape", "ocr"], task_weights=weights)
