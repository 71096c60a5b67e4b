"""The commands run on a Qwen2.5-VL checkpoint as they do on Qwen2-VL: chat, tokens, bench and
fine-tuning (every stage, packing, LoRA on the LLM and on the windowed ViT)."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_qwen25 import tiny_checkpoint
from tiny_train import write_dataset

import qwen2vl
from qwen2vl.cli import main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny25"))


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "p.png"
    pixels = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_one_shot_chat_answers_about_an_image(ckpt, picture, capsys):
    argv = ["--model", str(ckpt), "--dtype", "float32", "--image", picture]
    assert main(["chat", *argv, "--max-new-tokens", "5", "What is this?"]) == 0
    assert capsys.readouterr().out.strip()


def test_tokens_plans_with_the_checkpoint_settings(ckpt, picture, capsys):
    assert main(["tokens", picture, "--model", str(ckpt), "--max-pixels", "200000"]) == 0
    out = capsys.readouterr().out
    assert "400×300" in out and "prompt tokens:" in out


@pytest.mark.slow  # about 20 s: bandwidth reads and kernel choice on top of the runs
def test_bench_measures_a_qwen25_checkpoint(ckpt, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it now fails
    argv = ["--model", str(ckpt), "--image-size", "112", "--new-tokens", "3", "--repeats", "1"]
    assert main(["bench", *argv]) == 0
    table = capsys.readouterr().out.split("load s", 1)[1]
    assert next(line for line in table.splitlines() if line.startswith("qwen2vl bf16"))


@pytest.mark.parametrize(
    "flags",
    [
        ["--stage", "1"],
        ["--stage", "2"],
        ["--stage", "3"],
        ["--stage", "2", "--lora", "--lora-targets", "llm,vit"],
    ],
)
def test_fine_tuning_runs_and_saves_a_qwen25_checkpoint(ckpt, tmp_path, flags, one_thread):
    data = write_dataset(tmp_path, 4)
    out = tmp_path / "out"
    base = ["--model", str(ckpt), "--data", str(data), "--output", str(out)]
    argv = [*base, "--max-steps", "2", "--max-tokens", "256", "--lr", "1e-3", *flags]
    assert main(["train", *argv]) == 0
    trained = qwen2vl.load_model(out, dtype="float32")
    assert trained.cfg == qwen2vl.load_model(ckpt).cfg
    assert trained.cfg.model_type == "qwen2_5_vl"
    before = qwen2vl.load_model(ckpt, dtype="float32").state_dict()
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])}
    assert changed
    if flags[1] == "1":
        assert all(k.startswith("visual.") for k in changed)


def test_a_fine_tuned_qwen25_checkpoint_loads_in_transformers(ckpt, tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    data = write_dataset(tmp_path, 2)
    out = tmp_path / "out"
    argv = ["--model", str(ckpt), "--data", str(data), "--output", str(out), "--max-steps", "1"]
    assert main(["train", *argv, "--max-tokens", "256", "--lr", "1e-3"]) == 0
    proc = qwen2vl.load_processor(out)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    batch = proc(messages)
    ours = qwen2vl.load_model(out)
    theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(**batch).logits, theirs(**batch).logits, rtol=1e-4, atol=1e-4
        )


def video_messages(fps: float) -> list[dict]:
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)) for _ in range(4)]
    content = [
        {"type": "video", "video": frames, "sample_fps": fps},
        {"type": "text", "text": "What happens?"},
    ]
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("fps", [0.5, 4.0])
def test_pipeline_puts_videos_on_the_time_axis_as_transformers_does(ckpt, fps, one_thread):
    # Four and a half seconds per grid step: positions differ from the 2 fps default, so a path
    # that drops second_per_grid_ts gives other tokens. (At 1 fps this transformers version
    # continues the text elsewhere: see rope.mrope_positions.)
    transformers = pytest.importorskip("transformers")
    from tiny import reference

    pipe = qwen2vl.Pipeline.from_pretrained(ckpt, dtype="float32")
    messages = video_messages(fps)
    ours = pipe.complete(messages, max_new_tokens=12, temperature=0.0).token_ids
    batch = pipe.processor(messages)
    assert batch["second_per_grid_ts"].tolist() == [2 / fps]
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32)
    assert [ours] == reference(hf.eval(), batch, 12)
