from qwen2vl import bench
from qwen2vl.default_model import default_model_dir


def test_bench_runs_both_implementations_on_the_default_model(capsys):
    argv = ["--model", str(default_model_dir()), "--image-size", "56", "--new-tokens", "3"]
    assert bench.main([*argv, "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("load s") :]
    for name in ("qwen2vl bf16", "qwen2vl int8", "transformers bf16"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        assert len(row.split()) == len(name.split()) + 6  # every column has a number
    assert "decode" in out[out.index("ratios vs transformers") :]
