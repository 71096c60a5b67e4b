import math

import pytest
import torch
from torch import nn

from qwen2vl.train.optim import adamw, build_optimizer, lr_at


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(50, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int = 5) -> None:
    x = torch.arange(12) % 50
    for _ in range(steps):
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_cpu_parameters_get_the_fused_kernel_with_the_default_updates():
    fused, plain = _net(), _net()
    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    opt = adamw(fused.parameters(), **kwargs)
    assert opt.param_groups[0]["fused"] is True
    _train(fused, opt)
    _train(plain, torch.optim.AdamW(plain.parameters(), foreach=False, **kwargs))
    start = _net()
    for a, b, c in zip(fused.parameters(), plain.parameters(), start.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert (a - c).abs().max() > 1e-3  # trained, not left alone


def test_build_optimizer_decays_matrices_only_and_is_fused():
    net = _net()
    opt = build_optimizer(net, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    matrices, vectors = opt.param_groups
    assert matrices["weight_decay"] == 0.05 and vectors["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in matrices["params"])
    assert all(p.ndim < 2 for p in vectors["params"])
    assert matrices["fused"] and vectors["fused"]
    before = [p.detach().clone() for p in net.parameters()]
    _train(net, opt, steps=1)
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_frozen_parameters_are_left_out():
    net = _net()
    net[0].weight.requires_grad_(False)
    opt = build_optimizer(net, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95))
    held = [p for g in opt.param_groups for p in g["params"]]
    assert all(p is not net[0].weight for p in held) and len(held) == 6


@pytest.mark.parametrize(
    ("step", "expected"),
    [(0, 0.25), (3, 1.0), (4, 1.0), (14, 0.1), (99, 0.1)],
)
def test_lr_warms_up_then_follows_a_half_cosine(step, expected):
    assert lr_at(step, lr=1.0, min_lr=0.1, warmup=4, total=14) == pytest.approx(expected)


def test_lr_is_halfway_down_at_the_middle_of_the_cosine():
    mid = lr_at(9, lr=1.0, min_lr=0.0, warmup=4, total=14)
    assert mid == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
