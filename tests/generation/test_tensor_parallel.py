"""Tensor parallelism: 2 processes under torchrun (CPU, gloo) against one process, on tiny random
checkpoints (tests/tensor_parallel_worker.py runs the same checks in each process; one torchrun
launch for all of them)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensor_parallel_worker as worker
import torch

from qwen2vl.errors import ConfigError
from qwen2vl.generation import tensor_parallel
from qwen2vl.generation.load import load_for_inference
from qwen2vl.presets import preset
from qwen2vl.weights import load_model

WORKER = Path(worker.__file__)


def torchrun(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    """Two processes on this machine (gloo), started; ``finished`` waits for them."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [*command, *args], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


def finished(run: subprocess.Popen) -> tuple[str, str]:
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-4000:]
    return out, err


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return worker.write_checkpoints(tmp_path_factory.mktemp("tp"))


@pytest.fixture(scope="module")
def runs(checkpoints, tmp_path_factory):
    """(one process's results, [rank 0's, rank 1's] under TP 2), computed side by side."""
    small, real = checkpoints
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    started = torchrun(str(WORKER), str(small), str(real), str(two), "2")
    try:
        reference = worker.run(small, real, one, 1)
    finally:
        finished(started)
    return reference, [torch.load(two / f"rank{r}.pt") for r in (0, 1)]


def test_fp32_logits_match_one_process_for_text_image_video_and_a_batch(runs):
    one, (rank0, rank1) = runs
    assert set(one["logits"]) == {"text", "image", "video", "batch"}
    for name, want in one["logits"].items():
        assert torch.equal(rank0["logits"][name], rank1["logits"][name])  # ranks agree exactly
        assert (rank0["logits"][name] - want).abs().max() < 1e-5, name


def test_greedy_tokens_match_one_process(runs):
    one, (rank0, rank1) = runs
    assert rank0["greedy"] == rank1["greedy"] == one["greedy"]


def test_int8_greedy_tokens_match_one_process_int8(runs):
    one, (rank0, rank1) = runs
    assert rank0["int8"] == rank1["int8"] == one["int8"]


def test_each_rank_holds_half_of_the_llm_and_the_whole_vit(runs):
    one, ranks = runs
    for rank in ranks:
        # tied 255-token vocabulary: 128 rows a rank, and the norms whole on each
        assert 0.5 <= rank["memory"]["llm"] / one["memory"]["llm"] < 0.51
        assert rank["real_memory"]["llm"] / one["real_memory"]["llm"] == pytest.approx(0.5, 1e-3)
        assert rank["memory"]["vision"] == one["memory"]["vision"]


def test_pipeline_chat_under_tp_matches_one_process_and_sampling_agrees_across_ranks(runs):
    one, (rank0, rank1) = runs
    assert rank0["chat"] == rank1["chat"] == one["chat"] != ""
    assert rank0["chat_again"] == one["chat_again"] == one["chat"]  # reused prefix and features
    assert rank0["sampled"] == rank1["sampled"]  # no seed: rank 0's random state on both


def test_each_rank_reads_its_slices_of_the_checkpoint(checkpoints):
    """Without a process group: rank 1 of 2 built and loaded, compared with the whole model."""
    small, _ = checkpoints
    whole = load_model(small, dtype="float32").state_dict()
    shard = tensor_parallel.Shard(rank=1, size=2)
    local = tensor_parallel.load_sharded(small, "float32", shard)
    got = local.state_dict()
    layer = "model.layers.1."
    assert torch.equal(
        got[layer + "self_attn.k_proj.bias"], whole[layer + "self_attn.k_proj.bias"][16:]
    )
    assert torch.equal(
        got[layer + "self_attn.q_proj.weight"], whole[layer + "self_attn.q_proj.weight"][32:]
    )
    assert torch.equal(
        got[layer + "self_attn.o_proj.weight"], whole[layer + "self_attn.o_proj.weight"][:, 32:]
    )
    assert torch.equal(
        got[layer + "mlp.down_proj.weight"], whole[layer + "mlp.down_proj.weight"][:, 48:]
    )
    embed = got["model.embed_tokens.weight"]  # rows 128..254 and one zero row of padding
    assert torch.equal(embed[:127], whole["model.embed_tokens.weight"][128:])
    assert not embed[127].any()
    assert local.lm_head.shard.weight is local.model.embed_tokens.weight  # still tied
    assert local.model.layers[0].self_attn.num_heads == 2
    assert local.cfg.text.num_key_value_heads == 1 and local.cfg.text.head_dim == 16
    assert torch.equal(got["visual.merger.mlp.0.weight"], whole["visual.merger.mlp.0.weight"])


def test_a_size_that_does_not_divide_the_heads_is_refused_naming_the_numbers():
    with pytest.raises(ConfigError, match=r"tensor_parallel_size=4 does not divide "
                       r"num_key_value_heads=2; sizes that divide .*: 1, 2$"):  # fmt: skip
        tensor_parallel.shard_config(preset("2B"), 4)
    with pytest.raises(ConfigError, match="num_attention_heads=28, num_key_value_heads=4"):
        tensor_parallel.shard_config(preset("7B"), 8)
    assert tensor_parallel.shard_config(preset("72B"), 8).text.num_key_value_heads == 1


def test_tensor_parallel_outside_torchrun_says_how_to_launch(checkpoints):
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 2"):
        load_for_inference(checkpoints[0], "float32", tensor_parallel_size=2)
    with pytest.raises(ConfigError, match="tensor_parallel_size=0"):
        load_for_inference(checkpoints[0], "float32", tensor_parallel_size=0)


@pytest.mark.slow
def test_chat_command_under_torchrun_prints_the_answer_once(checkpoints, tmp_path):
    _, real = checkpoints
    args = ["-m", "qwen2vl", "chat", f"--model={real}", "--tensor-parallel-size=2"]
    out, err = finished(
        torchrun(*args, "--dtype=float32", "--max-new-tokens=8", "Hello there", cwd=tmp_path)
    )
    one = worker.Pipeline.from_pretrained(real, dtype="float32")
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}]
    want = one.chat(messages, max_new_tokens=8)
    assert out == want + "\n"
    assert "tensor parallel rank 1 of 2" in err  # each rank logs what it holds


def test_chat_under_tp_needs_the_question_as_an_argument(checkpoints, capsys):
    from qwen2vl.cli import main

    assert main(["chat", f"--model={checkpoints[1]}", "--tensor-parallel-size=2"]) == 2
    assert "give the question as an argument" in capsys.readouterr().err
