"""A new, randomly initialised model: where training from scratch starts.

    qwen2vl init ARCH_DIR --output DIR --seed 0      (ARCH_DIR: config.json + processor files)
    model = init_model(cfg, seed=0)

With `vocab` (`--vocab-data FILE...`: the ids those conversations hold), the embedding rows of
every other token start at exactly zero, so training with `lump_zero_rows` scores them as one
logit instead of one each (`vocab.py`).

Weights are drawn as transformers' `Qwen2VLPreTrainedModel._init_weights` draws them (linear,
conv and embedding weights N(0, 0.02), biases 0, norms 1), so a run from scratch starts where
one from transformers would. The draw is a fixed function of the seed (CPU generator), so a
recipe trained from scratch starts from the same weights on every machine.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from torch import nn

from qwen2vl.config import Qwen2VLConfig
from qwen2vl.model.qwen2vl import Qwen2VL
from qwen2vl.model.text import RMSNorm
from qwen2vl.processor import load_processor
from qwen2vl.train.checkpoint import copy_processor_files
from qwen2vl.train.vocab import data_token_ids
from qwen2vl.weights import save_pretrained

INIT_STD = 0.02  # transformers' initializer_range for Qwen2-VL


def init_model(
    cfg: Qwen2VLConfig,
    *,
    seed: int = 0,
    std: float | None = INIT_STD,
    embed_std: float | None = None,
    vocab: Collection[int] | None = None,
) -> Qwen2VL:
    """A float32 Qwen2VL with freshly drawn weights, on the CPU. std=None draws each matrix with
    std 1/sqrt(fan_in) instead (signals keep their scale through a narrow model; transformers'
    0.02 is sized for widths near 1000); embed_std overrides the embeddings' std. With `vocab`,
    the embedding and output rows of tokens outside it are zero (drawn, then zeroed: the other
    weights are the same draw either way)."""
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
        if vocab is not None:
            unused = torch.ones(cfg.text.vocab_size, dtype=torch.bool)
            unused[_ids(vocab, cfg.text.vocab_size)] = False
            model.model.embed_tokens.weight[unused] = 0.0
            model.lm_head.weight[unused] = 0.0
    return model.float()


def _ids(vocab: Collection[int], size: int) -> torch.Tensor:
    ids = torch.tensor(sorted(vocab), dtype=torch.long)
    if len(ids) and not (0 <= int(ids[0]) and int(ids[-1]) < size):
        raise ValueError(f"vocab ids must lie in [0, {size}): got {int(ids[0])}..{int(ids[-1])}")
    return ids


def write_initial(
    architecture: str | Path,
    output: str | Path,
    *,
    seed: int = 0,
    std: float | None = INIT_STD,
    embed_std: float | None = None,
    vocab_data: Sequence[str | Path] = (),
) -> Path:
    """A checkpoint directory of a new model: `architecture`'s config.json (and its processor
    files: preprocessor_config.json, generation_config.json ...) with weights drawn from `seed`
    (see `init_model` for std / embed_std), float32, and the bundled tokenizer where the
    architecture brings none. With `vocab_data` (JSONL conversations), only the tokens they
    hold get non-zero embedding rows. Training starts here."""
    architecture, output = Path(architecture), Path(output)
    cfg = Qwen2VLConfig.from_file(architecture / "config.json")
    vocab = None
    if vocab_data:
        vocab = data_token_ids(vocab_data, load_processor(architecture))
    model = init_model(cfg, seed=seed, std=std, embed_std=embed_std, vocab=vocab)
    save_pretrained(model, output, dtype=torch.float32)
    copy_processor_files(architecture, output)
    return output
