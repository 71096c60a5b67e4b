"""The parsing in benchmarks/llama_cpp.py, on output captured from llama-bench and llama-mtmd-cli
(llama-cpp-python 0.3.36's vendored llama.cpp); nothing is built or run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "llama_cpp.py"
spec = importlib.util.spec_from_file_location("llama_cpp_bench", SCRIPT)
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up there
spec.loader.exec_module(bench)


# llama-bench -p 8 -n 2 -o json, most fields left out (the spacing is its own)
LLAMA_BENCH_JSON = """[
  {
    "model_type": "qwen2vl ?B Q4_0",
    "n_threads": 2,
    "n_prompt": 8,
    "n_gen": 0,
    "n_depth": 0,
    "avg_ts": 346.673143,
    "stddev_ts": 0.000000,
    "samples_ns": [ 23076492 ],
    "samples_ts": [ 346.673 ]
  },
  {
    "model_type": "qwen2vl ?B Q4_0",
    "n_threads": 2,
    "n_prompt": 0,
    "n_gen": 2,
    "n_depth": 0,
    "avg_ts": 63.747661,
    "stddev_ts": 0.000000,
    "samples_ns": [ 31373700 ],
    "samples_ts": [ 63.7477 ]
  }
]
"""


def test_llama_bench_json_gives_the_prompt_and_generation_rates():
    rates = bench.parse_llama_bench(LLAMA_BENCH_JSON)
    assert (rates.prompt, rates.decode) == (346.673143, 63.747661)


def test_llama_bench_json_without_a_generation_test_is_refused():
    with pytest.raises(ValueError, match="one pp and one tg"):
        bench.parse_llama_bench(json.dumps(json.loads(LLAMA_BENCH_JSON)[:1]))


def test_mtmd_log_gives_seconds_per_image_of_every_encode_batch():
    log = (
        "0.02.742.595 W       For normal use cases, please use the standard llama-cli\n"
        "0.03.034.768 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 5)\n"
        "0.42.054.978 I mtmd batch encoding done in 39020 ms\n"
        "0.42.918.193 I encoding mtmd batch, n_chunks = 2 (done = 3, total = 7)\n"
        "1.24.744.094 I mtmd batch encoding done in 41826 ms\n"
    )
    assert bench.parse_mtmd_encodes(log) == [39.02, 20.913, 20.913]
