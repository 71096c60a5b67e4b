"""A new model: weights drawn as transformers draws them, the same for the same seed, and a
checkpoint directory that our loader, our processor and transformers all read."""

import json

import pytest
import torch
from tiny_qwen2vl import tiny_config

import qwen2vl
from qwen2vl.train.init import INIT_STD, init_model, write_initial


def test_weights_follow_the_reference_init_and_the_seed():
    cfg = tiny_config(tie=True, real_vocab=True)
    a, b, c = init_model(cfg, seed=0), init_model(cfg, seed=0), init_model(cfg, seed=1)
    assert a.lm_head.weight is a.model.embed_tokens.weight
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert p.dtype == torch.float32
        assert torch.equal(p, q), name
        if name.endswith("norm.weight") or ".norm" in name or "ln_q" in name:
            assert torch.all(p == 1) if name.endswith("weight") else torch.all(p == 0), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        else:
            assert not torch.equal(p, r), name
            assert abs(p.std().item() - INIT_STD) < 0.1 * INIT_STD, name


def test_write_initial_makes_a_loadable_checkpoint(tmp_path):
    arch = tmp_path / "arch"
    arch.mkdir()
    cfg = tiny_config(tie=True, real_vocab=True)
    (arch / "config.json").write_text(json.dumps(cfg.to_hf()))
    (arch / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 12544}))
    out = write_initial(arch, tmp_path / "new", seed=3)
    model = qwen2vl.load_model(out)
    ref = init_model(cfg, seed=3)
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    proc = qwen2vl.load_processor(out)
    assert proc.media.max_pixels == 12544
    assert (out / "tokenizer.json").is_file()  # the bundled tokenizer, for transformers too
    transformers = pytest.importorskip("transformers")
    theirs = transformers.Qwen2VLForConditionalGeneration.from_pretrained(out)
    assert torch.equal(theirs.get_input_embeddings().weight, model.model.embed_tokens.weight)


def test_fan_in_init_scales_each_matrix_by_its_inputs():
    cfg = tiny_config(tie=True, real_vocab=True)
    model = init_model(cfg, seed=0, std=None, embed_std=0.125)
    emb = model.model.embed_tokens.weight
    assert abs(emb.std().item() - 0.125) < 0.01
    for name, p in model.named_parameters():
        if p.dim() >= 2 and "embed_tokens" not in name:
            want = p[0].numel() ** -0.5
            assert abs(p.std().item() - want) < 0.15 * want, name


@pytest.mark.parametrize("bad", [{"std": 0.0}, {"std": -0.02}, {"embed_std": 0.0}])
def test_a_std_must_be_positive(bad):
    with pytest.raises(ValueError, match="must be > 0"):
        init_model(tiny_config(tie=True, real_vocab=True), **bad)
