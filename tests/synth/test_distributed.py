"""The recipe's objectives under torchrun with 2 processes on CPU (gloo): the box-regression head,
which lives outside the wrapped model, is averaged over ranks (DDP and FSDP2), lumped zero rows
stay exact under DDP, and a row lifted from zero on one rank is scored on both. Each run is
compared with one process reading the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_train import one_thread  # noqa: F401 (autouse: tiny matmuls run faster on one thread)

import qwen2vl
from qwen2vl.synth.build import stage_objectives
from qwen2vl.train import TrainConfig, train
from qwen2vl.train.metrics import read_metrics

# Stage 2 trains everything, the tied embedding included.
OPTIONS = dict(stage=2, max_tokens=96, lr=5e-3, warmup_steps=1, max_steps=4, save_every=2)
ROOT = str(Path(qwen2vl.__file__).parents[1])  # the package under test, not an installed one

# argv: the TrainConfig options and the objectives (as a stage config names them), in JSON
TRAIN = """
import json, sys
from qwen2vl.synth.build import stage_objectives
from qwen2vl.train import TrainConfig, train
options, objectives = json.loads(sys.argv[1]), json.loads(sys.argv[2])
train(TrainConfig(**options), objectives=stage_objectives(objectives))
"""


def torchrun(tmp_path, script: str, *args: str) -> None:
    path = tmp_path / "script.py"
    path.write_text(script)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", str(path), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def one_and_two_processes(tmp_path, model, data, objectives: dict, **options) -> tuple:
    """The losses of one process (grad_accum 2) and of two under torchrun (grad_accum 1): the
    same two rows per step."""
    paths = dict(model=str(model), data=str(data))
    one = TrainConfig(**paths, output=str(tmp_path / "one"), grad_accum=2, **OPTIONS, **options)
    losses = train(one, objectives=stage_objectives(objectives)).losses
    two = dict(paths, output=str(tmp_path / "two"), grad_accum=1, **OPTIONS, **options)
    torchrun(tmp_path, TRAIN, json.dumps(two), json.dumps(objectives))
    return losses, read_metrics(tmp_path / "two" / "metrics.jsonl")


def text_only_line(helpers) -> str:
    """A conversation long enough to fill a row alone: that row has no media of its own."""
    return json.dumps({"messages": helpers.conversation(None, "Count.", " ".join(["one"] * 60))})


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_box_regression_head_is_averaged_over_ranks(tiny_ckpt, tmp_path, helpers, strategy):
    """The head lives outside the wrapped model: its gradients are averaged by hand. A head
    that drifted apart on each rank would move the model differently from step 2 on."""
    data = helpers.write_grounding(tmp_path, 8)
    # a row of text alone: that rank has no box loss in its step and must still join the average
    data.write_text(data.read_text() + text_only_line(helpers) + "\n")
    objectives = {"box_regression": {"weight": 1.0}}
    one, records = one_and_two_processes(tmp_path, tiny_ckpt, data, objectives, strategy=strategy)
    assert [r["loss"] for r in records] == pytest.approx(one, rel=1e-5)
    assert all(r["box_regression"] is not None for r in records)


def test_ddp_with_lumped_rows_matches_one_process(tiny_ckpt, tmp_path, helpers):
    data = helpers.write_dataset(tmp_path, 4, [text_only_line(helpers)])
    zeroed = tmp_path / "zeroed"
    net = qwen2vl.load_model(tiny_ckpt)
    with torch.no_grad():
        net.lm_head.weight.zero_()  # every row lumped until its token occurs
    qwen2vl.save_pretrained(net, zeroed)
    objectives = {"lumped_vocab": {}}
    one, records = one_and_two_processes(tmp_path, zeroed, data, objectives, strategy="ddp")
    assert [r["loss"] for r in records] == pytest.approx(one, rel=1e-5)


LIVE_ROWS = """
import os, sys, torch, torch.distributed as dist
from qwen2vl.train import distributed as D
from qwen2vl.synth.vocab import LiveRows
env = D.setup("cpu")
weight = torch.zeros(6, 2)
live = LiveRows(weight)
live.rows(torch.tensor([[env.rank + 1]]))  # rank 0's batch holds token 1, rank 1's token 2
weight[[1, 2]] = 1.0  # the step moved both rows, on both processes
live.update(weight, env)
torch.save(live.rows(torch.tensor([[5]])), os.path.join(sys.argv[1], f"{env.rank}.pt"))
D.teardown(env)
"""


def test_a_row_lifted_from_zero_on_one_rank_is_scored_on_both(tmp_path):
    """Each process reads only its own batches' rows after a step (vocab.LiveRows); a row that
    left zero through the other process's batch must be scored here too, or its logit would
    count as 0 while it is not."""
    torchrun(tmp_path, LIVE_ROWS, str(tmp_path))
    for rank in (0, 1):
        assert torch.load(tmp_path / f"{rank}.pt").tolist() == [1, 2, 5]
