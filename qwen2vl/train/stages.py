"""The three Qwen2-VL training stages as sets of frozen modules, and LoRA on top of them.

Stage 1 (image-text alignment): ViT + merger trainable, LLM frozen.
Stage 2 (multi-task pre-training): everything trainable.
Stage 3 (instruction following): ViT frozen; LLM and merger trainable.

A set is a list of module-path prefixes (`visual.blocks`, `model.layers.0`, `lm_head` ...). An
explicit `freeze` list replaces the stage's. With LoRA, the adapted part (the LLM by default,
the ViT blocks with "vit") is frozen except for its adapters; the rest follows the stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from qwen2vl.errors import ConfigError
from qwen2vl.train.lora import apply_lora

STAGE_FROZEN: dict[int, tuple[str, ...]] = {
    1: ("model", "lm_head"),
    2: (),
    3: ("visual.patch_embed", "visual.blocks"),
}
# What "llm" and "vit" LoRA adapt; their other weights (norms, embeddings, biases) are frozen.
LORA_SCOPES: dict[str, tuple[str, ...]] = {
    "llm": ("model", "lm_head"),
    "vit": ("visual.patch_embed", "visual.blocks"),
}


@dataclass
class TrainableReport:
    trainable: list[str]  # parameter names
    frozen: list[str]
    lora_modules: list[str]
    trainable_params: int
    total_params: int

    def summary(self) -> str:
        lora = f", LoRA on {len(self.lora_modules)} linears" if self.lora_modules else ""
        share = 100 * self.trainable_params / max(1, self.total_params)
        return (
            f"trainable {self.trainable_params:,} of {self.total_params:,} parameters "
            f"({share:.2f}%){lora}"
        )


def frozen_prefixes(stage: int, freeze: Sequence[str] | None = None) -> tuple[str, ...]:
    if freeze is not None:
        return tuple(freeze)
    if stage not in STAGE_FROZEN:
        raise ConfigError(f"stage must be one of {sorted(STAGE_FROZEN)}, got {stage!r}")
    return STAGE_FROZEN[stage]


def configure_trainable(
    model: nn.Module,
    *,
    stage: int,
    freeze: Sequence[str] | None = None,
    lora: bool = False,
    lora_targets: Sequence[str] = ("llm",),
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
) -> TrainableReport:
    """Freeze the stage's (or the given) modules and, with LoRA, swap in adapters. In place."""
    frozen = frozen_prefixes(stage, freeze)
    _check_prefixes(model, frozen)
    wrapped: list[str] = []
    scopes: list[str] = []
    if lora:
        scopes = [p for t in lora_targets for p in LORA_SCOPES[t]]
        wrapped = apply_lora(
            model, scopes, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, skip=frozen
        )
        if not wrapped:
            raise ConfigError(
                f"LoRA on {list(lora_targets)} adapts nothing: stage {stage} freezes it "
                f"({list(frozen)}); choose other lora_targets (llm, vit) or another stage"
            )
    named = list(model.named_parameters(remove_duplicate=False))
    for _, p in named:
        p.requires_grad_(True)
    for name, p in named:  # a tied weight is frozen when any of its names is
        adapter = name.endswith((".lora_A", ".lora_B"))
        if _under(name, frozen) or (_under(name, scopes) and not adapter):
            p.requires_grad_(False)
    return _report(model, wrapped)


def _report(model: nn.Module, wrapped: list[str]) -> TrainableReport:
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    return TrainableReport(
        trainable=trainable,
        frozen=[n for n, p in params.items() if not p.requires_grad],
        lora_modules=wrapped,
        trainable_params=sum(params[n].numel() for n in trainable),
        total_params=sum(p.numel() for p in params.values()),
    )


def _check_prefixes(model: nn.Module, prefixes: Sequence[str]) -> None:
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    unknown = [p for p in prefixes if not any(_under(n, (p,)) for n in names)]
    if unknown:
        tops = sorted({n.rsplit(".", 2)[0] for n in names if n.count(".") <= 3})[:12]
        raise ConfigError(f"freeze: {unknown} match no parameters (module paths look like {tops})")


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
