"""Done-when: a tiny model overfits 8 samples in each stage; frozen weights stay bit-identical."""

import pytest
import torch

from qwen2vl.train import SampleList, TrainConfig, train

# (stage, options, steps, final loss below)
RUNS = {
    "stage1": (1, {}, 200, 0.02),
    "stage2": (2, {}, 60, 0.01),
    "stage3": (3, {}, 60, 0.01),
    "stage3_lora": (3, {"lora": True, "lora_rank": 8, "lora_alpha": 16}, 80, 0.05),
}


@pytest.mark.parametrize("name", RUNS)
def test_tiny_model_overfits_eight_samples(tiny64, tmp_path, name):
    stage, options, steps, limit = RUNS[name]
    model = tiny64.model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(
        output=str(tmp_path), stage=stage, max_steps=steps, lr=1e-2, warmup_steps=5,
        max_tokens=512, **options,
    )  # fmt: skip
    result = train(cfg, model=model, data=SampleList(tiny64.samples(8)))
    assert result.losses[0] > 3 and result.losses[-1] < limit, result.losses[-1]
    trainable = set(result.trainable.trainable)
    for key, tensor in model.state_dict().items():
        original = before.get(key.replace(".base_layer", ""))  # LoRA wraps the original
        if original is None:
            continue  # a LoRA adapter
        if key in trainable:
            assert not torch.equal(tensor, original), f"trainable {key} did not change"
        else:
            assert torch.equal(tensor, original), f"frozen {key} changed"
    trained_parts = {"1": "visual.blocks", "2": "model.layers", "3": "visual.merger"}
    assert any(n.startswith(trained_parts[str(stage)]) for n in result.trainable.trainable)
