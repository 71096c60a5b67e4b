"""torchrun with 2 processes on CPU (gloo): DDP and FSDP2 give the one-process losses for the same
global batch, and checkpoints resume across process counts (2 -> 1 and 1 -> 2). The recipe's
objectives under torchrun: tests/synth/test_distributed.py."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import qwen2vl
from qwen2vl.train import TrainConfig, train, validate
from qwen2vl.train.metrics import read_metrics
from qwen2vl.train.packing import PackSchedule

# Stage 2 trains everything, the tied embedding included (FSDP2 must keep it tied).
OPTIONS = dict(stage=2, max_tokens=96, lr=5e-3, warmup_steps=1, max_steps=4, save_every=2)
ROWS_PER_STEP = 2  # one process x grad_accum 2 == two processes x grad_accum 1


@pytest.fixture(scope="module")
def files(tiny_ckpt, tmp_path_factory, helpers):
    root = tmp_path_factory.mktemp("dist")
    # Long enough to fill a row alone: that row has no media of its own.
    text_only = json.dumps(helpers.conversation(None, "Count.", " ".join(["one"] * 60)))
    return tiny_ckpt, helpers.write_dataset(root, 4, [text_only])


@pytest.fixture(scope="module")
def single(files, tmp_path_factory):
    """The one-process run: (losses, output directory)."""
    model, data = files
    out = tmp_path_factory.mktemp("single")
    torch.set_num_threads(1)
    cfg = TrainConfig(model=str(model), data=str(data), output=str(out), grad_accum=2, **OPTIONS)
    return train(cfg).losses, out


def torchrun(model, data, out, *extra):
    args = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items()]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
        "-m", "qwen2vl.train", f"--model={model}", f"--data={data}", f"--output={out}",
        "--grad-accum=1", *args, *extra,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_the_data_exercises_short_steps_and_rows_without_media(files):
    model, data = files
    loaded, _ = validate(TrainConfig(model=str(model), data=str(data), output="unused"))
    schedule = PackSchedule(
        loaded.info, capacity=OPTIONS["max_tokens"], rows_per_step=ROWS_PER_STEP, seed=0,
        epochs=1, max_steps=OPTIONS["max_steps"],
    )  # fmt: skip
    steps = [schedule.rows(s)[2] for s in range(schedule.total)]
    assert any(len(rows) < ROWS_PER_STEP for rows in steps)  # a rank gets only the dummy row
    assert any(not any(loaded.info[i].visual for i in row) for rows in steps for row in rows)


def test_ddp_matches_one_process_and_its_checkpoint_resumes_on_one(files, single, tmp_path):
    model, data = files
    losses, _ = single
    ddp = torchrun(model, data, tmp_path / "ddp", "--strategy=ddp")
    assert ddp == pytest.approx(losses, rel=1e-5)
    out = tmp_path / "one"
    shutil.copytree(tmp_path / "ddp" / "checkpoint-2", out / "checkpoint-2")
    cfg = TrainConfig(
        model=str(model), data=str(data), output=str(out), resume="auto", **OPTIONS
    )  # grad_accum 1 here: resume raises it to 2 to keep 2 rows per step
    resumed = train(cfg)
    assert resumed.losses == pytest.approx(losses[2:], rel=1e-5)


def test_fsdp2_resumes_a_one_process_checkpoint_on_two(files, single, tmp_path):
    model, data = files
    losses, single_out = single
    out = tmp_path / "fsdp"
    shutil.copytree(single_out / "checkpoint-2", out / "checkpoint-2")
    shutil.copyfile(single_out / "metrics.jsonl", out / "metrics.jsonl")
    fsdp = torchrun(model, data, out, "--strategy=fsdp", "--resume=auto")
    assert fsdp == pytest.approx(losses, rel=1e-5)  # steps 1-2 kept, 3-4 trained under FSDP2
    final = qwen2vl.load_model(out)  # gathered, saved by rank 0, tied embedding intact
    reference = qwen2vl.load_model(single_out)
    assert final.lm_head.weight is final.model.embed_tokens.weight
    for (name, a), (_, b) in zip(
        final.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
