import sys

import pytest

from qwen2vl import bench
from qwen2vl.cli import main
from qwen2vl.default_model import default_model_dir


def test_bench_measures_bf16_and_int8_without_transformers(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails
    argv = ["--model", str(default_model_dir()), "--image-size", "56", "--new-tokens", "3"]
    assert main(["bench", *argv, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    table = out.split("load s", 1)[1].split("constrained decoding", 1)[0]
    for name in ("qwen2vl bf16", "qwen2vl int8"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert len(row.split()) == len(name.split()) + 6  # every column has a number
    assert "transformers" not in table
    grammar = out.split("constrained decoding (llguidance, JSON schema): ", 1)[1]
    assert "ms per token" in grammar and "% of a bf16 decode step" in grammar


def test_grammar_cost_is_measured_over_a_json_schema_answer():
    per_token, compile_s = bench.measure_grammar(default_model_dir(), "cpu", repeats=1)
    assert 0 < per_token < 1 and 0 < compile_s < 5  # a smoke check: CPUs here are shared


def test_decode_rate_counts_the_tokens_over_the_time():
    assert bench.decode_rate(31, 31, 2.0) == 15.5


def test_a_reference_that_stopped_early_gets_no_rate():
    # asked for 32 tokens, it stopped after the first: no decode, and no time to divide by
    with pytest.raises(bench.MeasurementError, match="stopped early"):
        bench.decode_rate(0, 31, 1e-9)


def test_a_near_zero_decode_time_gets_no_rate():
    with pytest.raises(bench.MeasurementError, match="not a real decode rate"):
        bench.decode_rate(31, 31, 1e-9)
    with pytest.raises(bench.MeasurementError, match="not a real decode rate"):
        bench.decode_rate(31, 31, -0.2)  # an n-token run timed faster than a 1-token one


def test_decode_needs_at_least_three_new_tokens(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--new-tokens", "2"])
    assert "at least 3 new tokens" in capsys.readouterr().err
