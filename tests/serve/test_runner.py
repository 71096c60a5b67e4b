"""The runner under tensor parallelism: rank 0's calls reach the other ranks, the server under
TP 2 (real torchrun processes, gloo) answers the openai client as TP 1 does, and a lost rank
makes the server answer 503 and exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import tensor_parallel_worker as worker
from engine_steps import engine_for, run_until_done, submit

from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.serve.engine import Unavailable
from qwen2vl.serve.runner import Leader, RankLost

try:  # the openai client brings httpx2 (openai 3.x) or httpx (earlier)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")


class Recorder(Leader):
    """A leader with no other ranks: records each call; ``lose_at`` makes that call fail."""

    def __init__(self, lose_at: int | None = None):
        super().__init__()
        self.calls: list[str] = []
        self.lose_at = lose_at

    def send(self, name, args):
        self.calls.append(name)
        if len(self.calls) == self.lose_at:
            raise RankLost("a tensor-parallel rank was lost")

    def stop(self):
        self.calls.append("stop")


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt, dtype="float32")


def led_engine(pipe, leader):
    engine = engine_for(pipe, max_num_seqs=2, max_model_len=256)
    engine.runner.leader = leader
    return engine


def test_every_model_and_cache_call_goes_to_the_other_ranks_in_order(pipe):
    leader = Recorder()
    engine = led_engine(pipe, leader)
    out = submit(engine, pipe, [{"role": "user", "content": "Hello"}], max_new_tokens=3)
    run_until_done(engine, [out])
    # prefill, admission, a decode step per token after the first, then the slot freed
    assert leader.calls == ["start_prompt", "prefill", "admit", "decode", "decode", "release"]
    assert out.tokens == submit_alone(pipe)


def submit_alone(pipe):
    engine = engine_for(pipe, max_num_seqs=2, max_model_len=256)
    out = submit(engine, pipe, [{"role": "user", "content": "Hello"}], max_new_tokens=3)
    run_until_done(engine, [out])
    return out.tokens


def test_a_lost_rank_ends_every_request_with_503_and_refuses_new_ones(pipe):
    leader = Recorder(lose_at=5)  # the second decode step
    engine = led_engine(pipe, leader)
    lost = []
    engine.on_lost = lambda: lost.append(True)
    outs = [submit(engine, pipe, [{"role": "user", "content": f"Hi {i}"}], max_new_tokens=9)
            for i in range(2)]  # fmt: skip
    waiting = submit(engine, pipe, [{"role": "user", "content": "later"}], max_new_tokens=9)
    engine.start()
    deadline = time.monotonic() + 30
    while not all(o.finish for o in [*outs, waiting]) and time.monotonic() < deadline:
        time.sleep(0.01)
    for out in [*outs, waiting]:
        assert out.finish.reason == "cancelled" and "rank was lost" in out.finish.message
    assert lost == [True] and engine.lost
    with pytest.raises(Unavailable, match="rank was lost"):
        submit(engine, pipe, [{"role": "user", "content": "again"}], max_new_tokens=2)
    engine.stop()
    assert "stop" not in leader.calls  # nobody left to tell


def test_an_idle_leader_pings_the_other_ranks(pipe, monkeypatch):
    monkeypatch.setattr("qwen2vl.serve.engine.HEARTBEAT_S", 0.05)
    leader = Recorder()
    engine = led_engine(pipe, leader)
    engine.start()
    time.sleep(0.5)
    engine.stop()
    assert leader.calls.count("ping") >= 3 and leader.calls[-1] == "stop"


# ---- real processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A tiny checkpoint over the real vocabulary whose heads divide by 2, and its picture."""
    root = tmp_path_factory.mktemp("tp-serve")
    _, path = worker.write_checkpoints(root)
    return path


SERVE = ["-m", "qwen2vl", "serve", "--dtype=float32", "--max-model-len=1024",
         "--log-level=warning", "--tensor-parallel-size=2"]  # fmt: skip


def start(cmd: list[str], env: dict | None = None, cwd=None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip


def wait_ready(url: str, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(procs[0].communicate()[0][-4000:])
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError("the server did not start")


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def questions(helpers) -> list[dict]:
    image = helpers.data_uri(helpers.picture(4))
    system = {"role": "system", "content": "You answer briefly and carefully, every time."}
    return [
        dict(messages=[system, {"role": "user", "content": "Hello there"}], max_tokens=8),
        dict(messages=[system, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "What is this?"}]}], max_tokens=8),
        dict(messages=[{"role": "user", "content": "Tell me more"}], max_tokens=6, n=2,
             temperature=0.9, seed=3),
    ]  # fmt: skip


def answers(client, model: str, asks: list[dict]) -> list:
    out = []
    for ask in [*asks, asks[1]]:  # the last again: from the prefix cache
        r = client.chat.completions.create(model=model, **{"temperature": 0, **ask})
        out.append(([c.message.content for c in r.choices], r.usage))
    stream = client.chat.completions.create(model=model, stream=True, temperature=0, **asks[0])
    out.append("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
    return out


def test_the_server_under_tp_2_answers_the_openai_client_as_tp_1(
    real, start_server, helpers, free_port, tmp_path
):
    port = free_port()
    run = start([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node=2", *SERVE, f"--model={real}", f"--port={port}"],
                cwd=tmp_path)  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{port}", [run])
        import openai

        two_client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                   max_retries=0, timeout=120)  # fmt: skip
        two = answers(two_client, "real", questions(helpers))
    finally:
        stop([run])
    with start_server(real) as one_server:
        one = answers(one_server.client(), "real", questions(helpers))
    assert [a[0] for a in two[:4]] == [a[0] for a in one[:4]] and two[4] == one[4]
    assert all(text for texts, _ in two[:4] for text in texts)
    cached = [a[1].prompt_tokens_details.cached_tokens for a in (one[3], two[3])]
    assert cached[0] == cached[1] > 0  # the repeat reused its prefix
    log = run.communicate()[0]  # torchrun's own exit on Ctrl-C is 1, with its traceback
    assert "qwen2vl/serve" not in log and "ERROR" not in log, log[-3000:]


def test_a_lost_rank_makes_the_server_answer_503_and_exit(real, free_port, tmp_path):
    """Two ranks started by hand (as on two machines), so no torchrun agent stops rank 0 for
    us: rank 0 must notice by itself."""
    port, master = free_port(), free_port()
    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master), WORLD_SIZE="2")
    procs = [
        start([sys.executable, *SERVE, f"--model={real}", f"--port={port}"],
              dict(env, RANK=str(r), LOCAL_RANK=str(r)), cwd=tmp_path)
        for r in (0, 1)
    ]  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, procs)
        body = {"model": "real", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
        procs[1].kill()
        procs[1].wait()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 503 and "rank was lost" in r.json()["error"]["message"]
        assert procs[0].wait(60) == 1  # exits by itself, never hangs
    finally:
        stop(procs)
    log = procs[0].communicate()[0]
    assert "Traceback" not in log, log[-3000:]
