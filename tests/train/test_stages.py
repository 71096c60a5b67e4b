"""Stage freeze sets, explicit freeze lists and LoRA scopes."""

import pytest

from qwen2vl.errors import ConfigError
from qwen2vl.train import configure_trainable


def trainable_tops(model) -> set[str]:
    tops = set()
    for name, p in model.named_parameters():
        if p.requires_grad:
            parts = name.split(".")
            tops.add(".".join(parts[:2]) if parts[0] == "visual" else parts[0])
    return tops


@pytest.mark.parametrize(
    "stage, expected",
    [
        (1, {"visual.patch_embed", "visual.blocks", "visual.merger"}),
        (2, {"visual.patch_embed", "visual.blocks", "visual.merger", "model", "lm_head"}),
        (3, {"visual.merger", "model", "lm_head"}),
    ],
)
def test_stage_sets(tiny64, stage, expected):
    model = tiny64.model()
    report = configure_trainable(model, stage=stage)
    assert trainable_tops(model) == expected
    assert (
        report.trainable_params
        + sum(p.numel() for n, p in model.named_parameters() if n in report.frozen)
        == report.total_params
    )


def test_explicit_freeze_replaces_the_stage(tiny64):
    model = tiny64.model()
    configure_trainable(model, stage=2, freeze=["visual", "model.embed_tokens"])
    assert trainable_tops(model) == {"model", "lm_head"}
    assert not model.model.embed_tokens.weight.requires_grad
    assert model.model.layers[0].mlp.up_proj.weight.requires_grad
    configure_trainable(model, stage=1, freeze=[])
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError, match="match no parameters"):
        configure_trainable(model, stage=2, freeze=["vision"])


def test_tied_embedding_is_frozen_under_either_name(tiny64):
    from tiny_qwen2vl import tiny_model

    model = tiny_model(tie=True)
    configure_trainable(model, stage=2, freeze=["lm_head"])
    assert not model.model.embed_tokens.weight.requires_grad


def test_lora_trains_adapters_and_what_the_stage_leaves_outside_its_scope(tiny64):
    model = tiny64.model()
    report = configure_trainable(model, stage=3, lora=True, lora_rank=4)
    assert len(report.lora_modules) == 2 * 7  # q k v o gate up down per layer
    trainable = set(report.trainable)
    assert all(".lora_" in n or n.startswith("visual.merger") for n in trainable)
    assert "model.layers.0.self_attn.q_proj.lora_A" in trainable
    assert not model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad


def test_lora_on_the_vit_never_adapts_the_patch_embedding(tiny64):
    model = tiny64.model()
    report = configure_trainable(model, stage=1, lora=True, lora_targets=["vit"])
    assert report.lora_modules and all(n.startswith("visual.blocks") for n in report.lora_modules)
    assert not model.visual.patch_embed.proj.weight.requires_grad
    assert model.visual.merger.mlp[0].weight.requires_grad
    with pytest.raises(ConfigError, match="adapts nothing"):
        configure_trainable(tiny64.model(), stage=1, lora=True)  # stage 1 freezes the LLM
