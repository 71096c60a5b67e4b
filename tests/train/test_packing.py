"""Packing: rows within max_tokens, positions restarting per sample, and the same loss as the
samples one by one."""

import json

import pytest
import torch
import torch.nn.functional as F

import qwen2vl
from qwen2vl.train import Sample, TrainConfig, collate, loss_sum, validate
from qwen2vl.train.data import SampleInfo
from qwen2vl.train.packing import (
    DUMMY_TOKENS,
    PackSchedule,
    pack_cost,
    packing_efficiency,
    plan_packs,
    shuffled,
    target_positions,
)


def infos(lengths, visual=True):
    return [SampleInfo(n, 1, visual) for n in lengths]


def test_first_fit_packs_every_sample_once_within_capacity():
    lengths = [70, 30, 55, 10, 90, 45, 20, 64, 33, 5]
    items = [SampleInfo(n, 1, i % 3 != 0) for i, n in enumerate(lengths)]
    rows = plan_packs(items, 100, shuffled(len(items), seed=0, epoch=0))
    assert sorted(i for row in rows for i in row) == list(range(len(items)))
    for row in rows:
        visual = any(items[i].visual for i in row)
        assert pack_cost(sum(items[i].tokens for i in row), visual) <= 100
    assert packing_efficiency(items, rows, 100) == sum(lengths) / (100 * len(rows))
    assert len(rows) == 5  # 422 tokens: 5 rows is the minimum
    with pytest.raises(ValueError, match="over max_tokens"):
        plan_packs(infos([101]), 100, [0])


def test_text_only_rows_leave_room_for_the_dummy_image():
    assert DUMMY_TOKENS == 3
    rows = plan_packs(infos([50, 48], visual=False), 100, [0, 1])
    assert rows == [[0], [1]]  # 98 + the dummy's 3 tokens would overflow
    assert plan_packs(infos([50, 47], visual=False), 100, [0, 1]) == [[0, 1]]
    assert plan_packs(infos([50, 50], visual=True), 100, [0, 1]) == [[0, 1]]


def test_schedule_is_a_function_of_the_step():
    items = infos([40, 30, 60, 20, 50, 70, 10])
    a = PackSchedule(items, capacity=100, rows_per_step=2, seed=3, epochs=2)
    b = PackSchedule(items, capacity=100, rows_per_step=2, seed=3, epochs=2)
    steps = [a.rows(s) for s in range(a.total)]
    assert steps == [b.rows(s) for s in reversed(range(b.total))][::-1]
    assert a.total == a.steps_in(0) + a.steps_in(1)
    epochs = [e for e, _, _ in steps]
    assert epochs == sorted(epochs) and set(epochs) == {0, 1}
    assert a.plan(0) != a.plan(1)  # reshuffled each epoch
    longer = PackSchedule(items, capacity=100, rows_per_step=2, seed=3, epochs=1, max_steps=9)
    assert longer.total == 9 and longer.rows(8)[0] >= 2  # max_steps runs on into more epochs


def test_collate_restarts_positions_and_shifts_targets_inside_each_sample(tiny64):
    samples = tiny64.samples(2, grids=((1, 4, 8), (1, 8, 4)))
    batch = collate(samples, tiny64.config())
    lengths = [len(s.ids) for s in samples]
    assert batch.cu_seqlens.tolist() == [0, lengths[0], sum(lengths)]
    assert batch.position_ids.shape == (3, 1, sum(lengths))
    second = batch.position_ids[:, 0, lengths[0] :]
    assert second[:, 0].tolist() == [0, 0, 0]  # restarts at 0
    alone = collate(samples[1:], tiny64.config())
    assert torch.equal(second, alone.position_ids[:, 0])
    assert batch.targets[lengths[0] - 1] == -100  # sample 0's last token predicts nothing
    assert batch.targets[: lengths[0] - 1].tolist() == samples[0].labels[1:]
    assert batch.image_grid_thw.tolist() == [[1, 4, 8], [1, 8, 4]]
    assert batch.n_targets == sum(s.targets for s in samples)


def test_a_row_without_media_still_runs_the_vision_tower(tiny64):
    model = tiny64.model()
    text = Sample(ids=[1, 5, 6, 2, 20, 3], labels=[-100] * 4 + [20, 3])
    batch = collate([text], model.cfg)
    assert batch.input_ids[0, -3:].tolist() == [tiny64.VSTART, tiny64.IMAGE, tiny64.VEND]
    assert batch.samples == 1 and batch.n_targets == 2
    loss_sum(model(**batch.model_inputs()).logits, batch.targets).backward()
    assert all(p.grad is not None for p in model.visual.parameters())


@pytest.fixture
def real_samples(tiny_ckpt, make_data, helpers):
    path = make_data(4, [json.dumps(helpers.conversation(None, "Plain text?", "Yes, plain."))])
    data, _ = validate(TrainConfig(model=str(tiny_ckpt), data=str(path), output="unused"))
    return [data[i] for i in range(len(data.info))]


def token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    keep = targets != -100
    return F.cross_entropy(logits[0][keep].float(), targets[keep], reduction="none")


def test_packed_row_gives_the_samples_own_losses(tiny_ckpt, real_samples):
    """Same loss means: every target token's loss in the packed row equals its loss with the
    sample run alone, so the summed loss and the target count are the sums of the samples'."""
    model = qwen2vl.load_model(tiny_ckpt)
    grids = {v.grid_thw for s in real_samples for v in s.visuals}
    assert len(grids) == 4 and not real_samples[-1].visuals  # 4 resolutions and a text-only one
    with torch.no_grad():
        packed = collate(real_samples, model.cfg)
        packed_losses = token_losses(model(**packed.model_inputs()).logits, packed.targets)
        alone, sums = [], []
        for s in real_samples:
            batch = collate([s], model.cfg)
            alone.append(token_losses(model(**batch.model_inputs()).logits, batch.targets))
            ids = torch.tensor([s.ids])
            media = ("pixel_values", "image_grid_thw") if s.visuals else ()  # no dummy alone
            inputs = {k: getattr(batch, k) for k in media}
            out = model(ids, labels=torch.tensor([s.labels]), **inputs)  # the model's own loss
            sums.append(out.loss * s.targets)
    torch.testing.assert_close(packed_losses, torch.cat(alone), rtol=0, atol=1e-5)
    total = loss_sum(model(**packed.model_inputs()).logits, packed.targets).detach()
    torch.testing.assert_close(total, torch.stack(sums).sum(), rtol=1e-6, atol=1e-5)
    assert packed.n_targets == sum(s.targets for s in real_samples)


def test_logits_of_the_target_positions_only_give_the_same_loss(tiny_ckpt, real_samples):
    """The trainer asks for logits where targets are (a [T, V] logits tensor costs more than
    the rest of a small model); loss and gradients equal those of the full logits."""
    model = qwen2vl.load_model(tiny_ckpt)
    packed = collate(real_samples, model.cfg)
    keep = target_positions(packed.targets)
    assert len(keep) == packed.n_targets < packed.tokens
    full = loss_sum(model(**packed.model_inputs()).logits, packed.targets)
    (g_full,) = torch.autograd.grad(full, model.lm_head.weight)
    logits = model(**packed.model_inputs(), logits_to_keep=keep).logits
    assert logits.shape[1] == len(keep)
    some = loss_sum(logits, packed.targets[keep])
    (g_some,) = torch.autograd.grad(some, model.lm_head.weight)
    torch.testing.assert_close(some, full, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(g_some, g_full, rtol=1e-5, atol=1e-6)
