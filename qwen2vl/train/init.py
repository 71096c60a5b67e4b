"""A new, randomly initialised model: where training from scratch starts.

    qwen2vl init ARCH_DIR --output DIR --seed 0      (ARCH_DIR: config.json + processor files)
    model = init_model(cfg, seed=0)

Weights are drawn as transformers' `Qwen2VLPreTrainedModel._init_weights` draws them (linear,
conv and embedding weights N(0, 0.02), biases 0, norms 1), so a run from scratch starts where
one from transformers would. The draw is a fixed function of the seed (CPU generator), so a
recipe trained from scratch starts from the same weights on every machine.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.model.text import RMSNorm
from qwen2vl.train.checkpoint import copy_processor_files
from qwen2vl.weights import save_pretrained

INIT_STD = 0.02  # transformers' initializer_range for Qwen2-VL


def init_model(
    cfg: Qwen2VLConfig,
    *,
    seed: int = 0,
    std: float | None = INIT_STD,
    embed_std: float | None = None,
) -> Qwen2VL:
    """A float32 Qwen2VL with freshly drawn weights, on the CPU. std=None draws each matrix with
    std 1/sqrt(fan_in) instead (signals keep their scale through a narrow model; transformers'
    0.02 is sized for widths near 1000); embed_std overrides the embeddings' std."""
    for name, value in (("std", std), ("embed_std", embed_std)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 (or None), got {value}")
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Qwen2VL(cfg)
    model = model.to_empty(device="cpu")
    model.tie_weights()  # to_empty allocates lm_head apart from the embedding
    with torch.no_grad():
        for module in model.modules():  # a tied lm_head is the embedding: drawn once more
            if isinstance(module, nn.Embedding) or module is model.lm_head:
                module.weight.normal_(0.0, embed_std or std or INIT_STD, generator=g)
            elif isinstance(module, (nn.Linear, nn.Conv3d)):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, fan_in**-0.5 if std is None else std, generator=g)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                module.weight.fill_(1.0)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
    return model.float()


def write_initial(
    architecture: str | Path,
    output: str | Path,
    *,
    seed: int = 0,
    std: float | None = INIT_STD,
    embed_std: float | None = None,
) -> Path:
    """A checkpoint directory of a new model: `architecture`'s config.json (and its processor
    files: preprocessor_config.json, generation_config.json ...) with weights drawn from `seed`
    (see `init_model` for std / embed_std), float32, and the bundled tokenizer where the
    architecture brings none. Training starts here."""
    architecture = Path(architecture)
    cfg = Qwen2VLConfig.from_file(architecture / "config.json")
    model = init_model(cfg, seed=seed, std=std, embed_std=embed_std)
    return save_initial(model, architecture, output)


def save_initial(model: Qwen2VL, architecture: str | Path, output: str | Path) -> Path:
    """`model` as a float32 checkpoint directory beside `architecture`'s processor files."""
    save_pretrained(model, output, dtype=torch.float32)
    copy_processor_files(architecture, output)
    return Path(output)
