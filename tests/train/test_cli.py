"""`qwen2vl train` / `python -m qwen2vl.train`: config files, flags, validation, the outputs."""

import json

import pytest
import torch

import qwen2vl
from qwen2vl.cli import main as qwen2vl_main
from qwen2vl.errors import ConfigError
from qwen2vl.train import load_config
from qwen2vl.train.metrics import read_metrics


def main(argv: list[str]) -> int:
    """`qwen2vl train ARGV`."""
    return qwen2vl_main(["train", *argv])


def test_config_file_with_flags_on_top(tmp_path):
    (tmp_path / "run.yaml").write_text(
        "model: ckpt\ndata: data/train.jsonl\noutput: out\nstage: 1\nmax-tokens: 512\n"
        "freeze: [visual.blocks]\nlr: 2.0e-4\nlora_targets: llm,vit\n"
    )
    cfg = load_config(tmp_path / "run.yaml", max_tokens=256, stage=2)
    assert cfg.model == str(tmp_path / "ckpt") and cfg.data == str(tmp_path / "data/train.jsonl")
    assert (cfg.stage, cfg.max_tokens, cfg.lr) == (2, 256, 2e-4)
    assert cfg.freeze == ["visual.blocks"] and cfg.lora_targets == ["llm", "vit"]
    (tmp_path / "run.toml").write_text('model = "/abs/ckpt"\nmax_steps = 7\nbf16 = true\n')
    cfg = load_config(tmp_path / "run.toml")
    assert (cfg.model, cfg.max_steps, cfg.bf16) == ("/abs/ckpt", 7, True)


@pytest.mark.parametrize(
    "text, match",
    [
        ("max_tokns: 5\n", "unknown options"),
        ("stage: 4\n", "stage must be"),
        ("too_long: cut\n", "too_long"),
        ("- a list\n", "table of options"),
        ("a: [\n", "cannot parse"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, text, match):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(tmp_path / "run.yaml")


def test_validate_only_lists_bad_lines_and_exits_nonzero(tiny_ckpt, make_data, tmp_path, capsys):
    path = make_data(2, ['{"messages": [{"role": "user", "content": "q"}]}'])
    base = ["--model", str(tiny_ckpt), "--data", str(path), "--output", str(tmp_path / "o")]
    assert main([*base, "--validate-only"]) == 2
    assert "train.jsonl:3: no assistant turn" in capsys.readouterr().err
    assert main([*base, "--validate-only", "--on-bad-line", "skip"]) == 0
    assert "3 lines, 2 usable, 1 bad" in capsys.readouterr().err
    assert not (tmp_path / "o" / "config.json").exists()


def test_a_run_leaves_a_model_transformers_loads_metrics_and_a_loss_curve(
    tiny_ckpt, make_data, tmp_path, capsys, caplog
):
    caplog.set_level("INFO", logger="qwen2vl.train")
    data = make_data(4)
    out = tmp_path / "out"
    config = {"model": str(tiny_ckpt), "data": str(data), "output": str(out), "max_tokens": 200}
    (tmp_path / "run.json").write_text(json.dumps(config))
    code = main(["--config", str(tmp_path / "run.json"), "--max-steps", "3", "--lr", "1e-3"])
    assert code == 0
    err = capsys.readouterr().err
    assert "tok/s" in err and "eta" in err and "packing efficiency" in caplog.text
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"

    ours = qwen2vl.load_model(out)
    proc = qwen2vl.load_processor(out)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    batch = proc(messages)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = proc.apply_chat_template(messages)
    assert tokenizer(text).input_ids == batch["input_ids"][0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4
        )
