"""Checkpoints: optimizer state without pickle, resume = uninterrupted, a kill mid-save is safe."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

import qwen2vl
from qwen2vl.errors import CheckpointError
from qwen2vl.train import SampleList, TrainConfig, train
from qwen2vl.train.checkpoint import (
    STATE_FILE,
    checkpoints,
    clean_partial,
    flatten_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    unflatten_optimizer_state,
)
from qwen2vl.train.metrics import read_metrics

# LoRA with dropout: resuming must also restore the random stream. Two rows per step.
OPTIONS = dict(
    stage=3, lora=True, lora_rank=4, lora_dropout=0.2, grad_accum=2, max_tokens=160,
    lr=5e-3, warmup_steps=2, max_steps=6, save_every=2, seed=7,
)  # fmt: skip


@pytest.fixture(scope="module")
def run_files(tiny_ckpt, tmp_path_factory, helpers):
    root = tmp_path_factory.mktemp("resume")
    return tiny_ckpt, helpers.write_dataset(root, 6)


@pytest.fixture(scope="module")
def reference(run_files, tmp_path_factory):
    """The uninterrupted run: (per-step losses, its output directory)."""
    model, data = run_files
    out = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    result = train(TrainConfig(model=str(model), data=str(data), output=str(out), **OPTIONS))
    assert len(result.losses) == 6
    return result.losses, out


def test_optimizer_state_round_trips_through_safetensors_and_json(tiny64):
    model = tiny64.model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.9))
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    state = {
        "state": {names[id(p)]: s for p, s in opt.state.items()},
        "param_groups": [{**opt.param_groups[0], "params": list(names.values())}],
    }
    tensors, meta = flatten_optimizer_state(state)
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    back = unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    assert back["param_groups"][0]["betas"] == (0.8, 0.9)
    for name, entry in state["state"].items():
        for key, value in entry.items():
            assert torch.equal(back["state"][name][key], value)


def test_resumed_run_repeats_the_uninterrupted_loss_curve(run_files, reference, tmp_path):
    (losses, ref_out), (model, data) = reference, run_files
    shutil.copytree(ref_out / "checkpoint-2", tmp_path / "checkpoint-2")
    shutil.copyfile(ref_out / "metrics.jsonl", tmp_path / "metrics.jsonl")  # holds steps 1-6
    cfg = TrainConfig(
        model=str(model), data=str(data), output=str(tmp_path), resume="auto", **OPTIONS
    )
    resumed = train(cfg)
    assert resumed.losses == pytest.approx(losses[2:], rel=1e-6)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    saved = load_checkpoint(tmp_path / "checkpoint-6")
    uninterrupted = load_checkpoint(ref_out / "checkpoint-6")
    for name, tensor in uninterrupted.trainable.items():
        torch.testing.assert_close(saved.trainable[name], tensor, rtol=1e-6, atol=1e-7)
    assert saved.state["step"] == 6 and saved.state["rows_per_step"] == 2
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_refuses_a_checkpoint_of_another_stage(run_files, reference, tmp_path):
    model, data = run_files
    checkpoint = reference[1] / "checkpoint-2"
    cfg = TrainConfig(
        model=str(model), data=str(data), output=str(tmp_path), resume=str(checkpoint)
    )
    with pytest.raises(CheckpointError, match="other parameters"):
        train(cfg)  # full stage 3, no LoRA


KILLABLE = """
import pathlib, sys, time
import qwen2vl.train.checkpoint as ckpt
from qwen2vl.cli import main

calls = []
flatten = ckpt.flatten_optimizer_state

def slow(state):  # the second save: model and trainable weights written, optimizer not yet
    calls.append(1)
    if len(calls) == 2:
        pathlib.Path(sys.argv[1]).write_text("saving")
        time.sleep(600)
    return flatten(state)

ckpt.flatten_optimizer_state = slow
raise SystemExit(main(["train", *sys.argv[2:]]))
"""


def test_kill_during_save_keeps_the_last_checkpoint_and_resumes(run_files, reference, tmp_path):
    model, data = run_files
    script, marker, out = tmp_path / "run.py", tmp_path / "saving", tmp_path / "out"
    script.write_text(KILLABLE)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in OPTIONS.items() if k != "lora"]
    args += ["--lora", f"--model={model}", f"--data={data}", f"--output={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *args], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the run never reached its second save"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    first = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]
    assert first == pytest.approx(reference[0][:4], rel=1e-5)  # another process, same numbers
    assert latest_checkpoint(out) == out / "checkpoint-2"
    assert not (out / "checkpoint-4").exists() and (out / ".partial" / "checkpoint-4").exists()
    qwen2vl.load_model(out / "checkpoint-2")  # the last good checkpoint still loads
    cfg = TrainConfig(model=str(model), data=str(data), output=str(out), resume="auto", **OPTIONS)
    resumed = train(cfg)
    assert not (out / ".partial").exists()
    assert resumed.losses == pytest.approx(reference[0][2:], rel=1e-5)
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_training_continues_from_a_plain_run_on_synthetic_data(tiny64, tmp_path):
    """bf16 autocast and gradient checkpointing run, and resume as well."""
    options = dict(
        output=str(tmp_path), stage=2, max_steps=4, save_every=2, lr=1e-2, max_tokens=256,
        bf16=True, gradient_checkpointing=True,
    )  # fmt: skip
    samples = SampleList(tiny64.samples(8))
    whole = train(TrainConfig(**options), model=tiny64.model(), data=samples)
    os.rename(tmp_path / "checkpoint-4", tmp_path / "old")
    resumed = train(TrainConfig(**options, resume="auto"), model=tiny64.model(), data=samples)
    assert whole.losses[-1] < whole.losses[0]
    assert resumed.losses == pytest.approx(whole.losses[2:], rel=1e-6)


def test_only_the_newest_checkpoints_are_kept(tiny64, tmp_path):
    cfg = TrainConfig(output=str(tmp_path), max_steps=3, save_every=1, keep_checkpoints=2)
    train(cfg, model=tiny64.model(), data=SampleList(tiny64.samples(2)))
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"


def write_trainer_files(path, step):
    """The files load_checkpoint reads (no HF model): enough to list, prune and load."""
    (path / "trainer").mkdir(parents=True)
    save_file({"w": torch.full((2,), float(step))}, str(path / "trainer" / "trainable.safetensors"))
    optim = {"state": {"w": {"exp_avg": torch.zeros(2)}}, "param_groups": [{"params": ["w"]}]}
    tensors, meta = flatten_optimizer_state(optim)
    save_file(tensors, str(path / "trainer" / "optimizer.safetensors"))
    (path / "trainer" / "optimizer.json").write_text(json.dumps(meta))
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


class Killed(BaseException):
    """The trainer dying mid-prune; a BaseException so that no `except Exception` swallows it."""


def kill_while_deleting(monkeypatch):
    """shutil.rmtree that removes a checkpoint's weights, then dies with the marker still there:
    the worst instant to be killed while a directory is being deleted."""

    def rmtree(path, *args, **kwargs):
        weights = path / "trainer" / "trainable.safetensors"
        if weights.exists():
            weights.unlink()
            raise Killed

    monkeypatch.setattr(shutil, "rmtree", rmtree)


@pytest.fixture
def four_checkpoints(tmp_path):
    for step in range(1, 5):
        write_trainer_files(tmp_path / f"checkpoint-{step}", step)
    return tmp_path


def test_a_killed_prune_lists_no_checkpoint_without_weights(four_checkpoints, monkeypatch):
    out = four_checkpoints
    kill_while_deleting(monkeypatch)
    with pytest.raises(Killed):
        prune_checkpoints(out, keep=2)
    monkeypatch.undo()
    assert [d.name for d in checkpoints(out)] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    assert all((d / "trainer" / "trainable.safetensors").is_file() for d in checkpoints(out))
    assert [p.name for p in (out / ".partial").iterdir()] == ["checkpoint-1.pruned"]
    clean_partial(out)  # what the next run does first
    assert not (out / ".partial").exists()


def test_resume_auto_never_picks_a_checkpoint_a_killed_prune_left_behind(
    four_checkpoints, monkeypatch
):
    """Falling back by moving the newest away (as the error message advises) reaches only
    checkpoints that load."""
    out = four_checkpoints
    kill_while_deleting(monkeypatch)
    with pytest.raises(Killed):
        prune_checkpoints(out, keep=2)
    monkeypatch.undo()
    while (latest := latest_checkpoint(out)) is not None:
        assert load_checkpoint(latest).state["step"] == int(latest.name.split("-")[1])
        shutil.rmtree(latest)


def test_an_uninterrupted_prune_leaves_no_partial_directory(four_checkpoints):
    prune_checkpoints(four_checkpoints, keep=2)
    assert [d.name for d in checkpoints(four_checkpoints)] == ["checkpoint-3", "checkpoint-4"]
    assert not (four_checkpoints / ".partial").exists()


def _no_marker(path):
    (path / STATE_FILE).unlink()


def _no_weights(path):
    (path / "trainer" / "trainable.safetensors").unlink()


def _broken_marker(path):
    (path / STATE_FILE).write_text('{"step": 2,')


def _truncated_optimizer(path):
    (path / "trainer" / "optimizer.safetensors").write_bytes(b"\x08\x00")


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (_no_marker, f"no {STATE_FILE}"),
        (_no_weights, "trainer/trainable.safetensors is missing"),
        (_broken_marker, f"{STATE_FILE} is unreadable"),
        (_truncated_optimizer, "trainer/optimizer.safetensors is unreadable"),
    ],
)
def test_loading_an_incomplete_checkpoint_names_the_problem_and_the_fix(tmp_path, damage, what):
    path = write_trainer_files(tmp_path / "checkpoint-2", 2)
    damage(path)
    with pytest.raises(CheckpointError, match="not a complete training checkpoint") as err:
        load_checkpoint(path)
    assert what in str(err.value) and "--resume auto" in str(err.value)


def test_loading_a_missing_directory_says_it_does_not_exist(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory.*--resume auto"):
        load_checkpoint(tmp_path / "checkpoint-9")


def test_resume_from_an_explicit_incomplete_checkpoint_refuses_to_start(tiny64, tmp_path):
    path = write_trainer_files(tmp_path / "checkpoint-2", 2)
    _no_weights(path)
    cfg = TrainConfig(output=str(tmp_path / "out"), max_steps=1, resume=str(path))
    with pytest.raises(CheckpointError, match="trainable.safetensors is missing"):
        train(cfg, model=tiny64.model(), data=SampleList(tiny64.samples(2)))
