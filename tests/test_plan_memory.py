import pytest
import tensor_parallel_worker as worker

from qwen2vl.cli import main
from qwen2vl.generation import tensor_parallel
from qwen2vl.generation.load import load_for_inference
from qwen2vl.plan_memory import GIB, tensor_shapes, weight_bytes
from qwen2vl.presets import preset


def test_the_table_has_a_row_per_size_storage_and_degree(capsys):
    assert main(["plan-memory", "--models", "2B", "72B", "--tp", "1", "8"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 2 * 2 * 2
    by = {tuple(r.split()[:3]): r.split()[3:] for r in rows}
    assert float(by["72B", "bf16", "1"][3]) == pytest.approx(146.7, abs=0.1)  # 146 GB: one device
    assert float(by["72B", "int8", "8"][3]) < 12
    assert "TP 8 does not divide 12 heads / 2 kv heads" in " ".join(by["2B", "bf16", "8"])


def test_the_plan_counts_the_bytes_the_loader_holds(tmp_path):
    small, _ = worker.write_checkpoints(tmp_path)
    cfg = worker.config(255, True, **worker.SMALL_IDS)
    shapes = tensor_shapes(cfg)
    rank0 = tensor_parallel.load_sharded(small, "bfloat16", tensor_parallel.Shard(0, 2))
    held = tensor_parallel.weight_bytes(rank0)
    assert weight_bytes(cfg, shapes, 2, int8=False) == (held["llm"], held["vision"])
    int8 = tensor_parallel.weight_bytes(load_for_inference(small, "bfloat16", quantize="int8"))
    assert weight_bytes(cfg, shapes, 1, int8=True) == (int8["llm"], int8["vision"])


def test_72b_at_tp_8_holds_an_eighth_of_the_llm_and_the_whole_vit():
    cfg = preset("72B")
    shapes = tensor_shapes(cfg)
    one, vit = weight_bytes(cfg, shapes, 1, int8=False)
    eight, vit8 = weight_bytes(cfg, shapes, 8, int8=False)
    assert vit8 == vit and eight / one == pytest.approx(1 / 8, rel=1e-3)
    assert one / GIB == pytest.approx(135.4, abs=0.1)


def test_markdown_gives_the_same_totals_one_column_per_degree(capsys):
    argv = ["plan-memory", "--models", "2B", "72B", "--tp", "1", "8"]
    assert main(argv) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    totals = {tuple(r.split()[:3]): r.split()[6] for r in rows if "does not divide" not in r}
    assert main([*argv, "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| model | weights | TP 1 | TP 8 |"
    cells = {tuple(c.strip() for c in line.strip("|").split("|")[:2]): line for line in lines[2:]}
    assert cells["2B", "bf16"].endswith(" | -" + " |")  # TP 8 does not divide 2B's heads
    for (model, storage, n), value in totals.items():
        column = 2 + [1, 8].index(int(n))
        shown = cells[model, storage].strip("|").split("|")[column].strip()
        assert float(shown) == pytest.approx(float(value), abs=0.051)
