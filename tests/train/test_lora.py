"""LoRA: a module swap that starts as the identity and merges back into plain weights."""

import torch

import qwen2vl
from qwen2vl.train import apply_lora, collate, merge_lora
from qwen2vl.train.checkpoint import write_model
from qwen2vl.train.lora import LoRALinear, merge_lora_state


def logits(model, batch):
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def perturb_adapters(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)


def test_lora_starts_as_the_original_and_merges_to_the_same_function(tiny64, tmp_path):
    model = tiny64.model()
    batch = collate(tiny64.samples(2), model.cfg)
    before = logits(model, batch)
    wrapped = apply_lora(model, ["model", "visual.blocks", "visual.patch_embed"], rank=4, alpha=8)
    assert "visual.blocks.0.attn.qkv" in wrapped and "lm_head" not in wrapped
    assert not any(n.startswith("visual.patch_embed") for n in wrapped)
    torch.testing.assert_close(logits(model, batch), before, rtol=0, atol=0)
    perturb_adapters(model)
    adapted = logits(model, batch)
    assert not torch.allclose(adapted, before)

    state = merge_lora_state(model.state_dict(), scaling=2.0)
    write_model(tmp_path / "merged", model.cfg, state, source=None)
    reloaded = qwen2vl.load_model(tmp_path / "merged")  # a plain checkpoint: strict keys
    torch.testing.assert_close(logits(reloaded, batch), adapted, rtol=1e-4, atol=1e-4)

    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(logits(model, batch), adapted, rtol=1e-4, atol=1e-4)
