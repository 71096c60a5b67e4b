"""LoRA as a module swap after construction, and the merge back to plain Linear layers.

`apply_lora` replaces chosen `nn.Linear` modules by `LoRALinear` (the frozen original under
`base_layer`, low-rank `lora_A` [r, in] and `lora_B` [out, r], as PEFT names them); the model's
forward is untouched. `lora_B` starts at zero, so the wrapped model computes exactly what the
original did until the first update. `merge_lora` swaps back (W + scale * B @ A), and
`merge_lora_state` does the same on a state dict, so a saved checkpoint is a plain model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Never adapted: the patch embedding (a Conv3d kept as is; adapting raw pixels is not LoRA's job).
NEVER = ("visual.patch_embed",)


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        kwargs = dict(device=base.weight.device, dtype=torch.float32)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kwargs))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kwargs))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(
            F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)
        )
        return self.base_layer(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear computing what this module computes (without dropout)."""
        base = self.base_layer
        out = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(merged_weight(base.weight, self.lora_A, self.lora_B, self.scaling))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out


def merged_weight(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """W + scaling * B @ A, computed in float32, returned in W's dtype."""
    return (weight.float() + scaling * (lora_b.float() @ lora_a.float())).to(weight.dtype)


def apply_lora(
    model: nn.Module,
    prefixes: Sequence[str],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    skip: Sequence[str] = (),
) -> list[str]:
    """Wrap every nn.Linear under `prefixes` (module paths) except those under `skip` or NEVER;
    returns the wrapped module names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not _under(name, prefixes):
            continue
        if _under(name, (*skip, *NEVER)) or name == "lm_head":
            continue  # lm_head: a vocabulary-sized adapter is no longer low-cost
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout))
        wrapped.append(name)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Swap every LoRALinear back to a plain Linear with the update merged in (in place)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict -> the plain model's: adapters merged, `base_layer.` removed."""
    out = {}
    for key, value in state.items():
        if key.endswith((".lora_A", ".lora_B")):
            continue
        prefix, _, rest = key.partition(".base_layer.")
        if not rest:
            out[key] = value
        elif rest == "weight":
            out[f"{prefix}.weight"] = merged_weight(
                value, state[f"{prefix}.lora_A"], state[f"{prefix}.lora_B"], scaling
            )
        else:
            out[f"{prefix}.{rest}"] = value
    return out


def _under(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
