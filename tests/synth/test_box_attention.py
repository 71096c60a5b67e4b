"""Box attention: targets read from the packed row, the loss equal to -log of the attention the
layer computes, and trainer runs (the head learns; rows without grounding answers: no change)."""

import numpy as np
import pytest
import torch
from tiny_train import one_thread  # noqa: F401 (autouse: tiny matmuls run faster on one thread)

import qwen2vl
from qwen2vl.errors import ConfigError
from qwen2vl.model.rope import mrope_cos_sin
from qwen2vl.processor import load_processor
from qwen2vl.synth.box_attention import (
    BoxAttention,
    box_attention_nll,
    box_cells,
    plan_box_attention,
)
from qwen2vl.train import TrainConfig
from qwen2vl.train import distributed as D
from qwen2vl.train.data import encode_conversation
from qwen2vl.train.objective import Run
from qwen2vl.train.packing import collate

GROUNDED = (
    "<|object_ref_start|>red square<|object_ref_end|><|box_start|>(500,0),(750,500)<|box_end|>"
)


def test_box_cells_keeps_the_cells_the_box_covers():
    assert box_cells((0.25, 0.0, 0.5, 0.5), rows=2, cols=4) == [1]
    assert box_cells((0.0, 0.0, 0.6, 1.0), rows=2, cols=4) == [0, 1, 2, 4, 5, 6]  # 0.4 of col 2
    assert box_cells((0.3, 0.1, 0.35, 0.2), rows=2, cols=4) == [1]  # inside one cell: that cell
    assert box_cells((0.26, 0.0, 0.54, 0.5), rows=2, cols=4) == [1]  # 0.16 of col 2: not enough


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return load_processor(tiny_ckpt)


def test_plan_reads_the_answer_box_of_its_own_sample(tiny_ckpt, processor, helpers):
    messages = helpers.conversation
    cfg = qwen2vl.load_model(tiny_ckpt).cfg
    samples = [
        encode_conversation(messages(helpers.picture(seed=1), "What is it?", "Noise."), processor),
        encode_conversation(
            messages(helpers.picture(), "Find the red square.", GROUNDED), processor
        ),
        # a box the user writes is no answer: not supervised
        encode_conversation(
            messages(helpers.picture(seed=2), f"Is it {GROUNDED}?", "Yes."), processor
        ),
    ]
    batch = collate(samples, cfg)
    plan = plan_box_attention(
        batch, processor.tokenizer, image_token_id=cfg.image_token_id, merge=2, tokens=2
    )
    ids = batch.input_ids[0]
    start = len(samples[0].ids)
    box_start = processor.tokenizer.special_id("<|box_start|>")
    p = start + samples[1].ids.index(box_start)
    assert plan.queries.tolist() == [p, p + 1]
    images = (ids == cfg.image_token_id).nonzero().squeeze(1).tolist()
    second = [i for i in images if start <= i < start + len(samples[1].ids)]
    assert len(second) == 8  # 112 x 56 pixels: 4 x 2 merged cells
    # (500,0),(750,500) on a 4 x 2 grid: the third cell of the first row
    for row in range(2):
        assert plan.target[row].nonzero().squeeze(1).tolist() == [second[2]]
        assert plan.visible[row].nonzero().squeeze(1).tolist() == list(range(start, p + row + 1))


def test_plan_is_none_without_grounding_answers(tiny_ckpt, processor, helpers):
    messages = helpers.conversation
    cfg = qwen2vl.load_model(tiny_ckpt).cfg
    samples = [
        encode_conversation(messages(helpers.picture(), "What is it?", "Noise."), processor),
        encode_conversation(messages(None, "Say (1,2),(3,4).", "(1,2),(3,4)"), processor),
    ]
    batch = collate(samples, cfg)
    assert plan_box_attention(batch, processor.tokenizer, image_token_id=cfg.image_token_id,
                              merge=2, tokens=2) is None  # fmt: skip


def test_loss_is_minus_log_of_the_layers_attention_on_the_box(tiny_ckpt, processor, helpers):
    messages = helpers.conversation
    model = qwen2vl.load_model(tiny_ckpt)
    cfg = model.cfg
    samples = [
        encode_conversation(messages(helpers.picture(seed=1), "What is it?", "Noise."), processor),
        encode_conversation(
            messages(helpers.picture(), "Find the red square.", GROUNDED), processor
        ),
    ]
    batch = collate(samples, cfg)
    plan = plan_box_attention(
        batch, processor.tokenizer, image_token_id=cfg.image_token_id, merge=2, tokens=3
    )
    attn = model.model.layers[1].self_attn
    torch.manual_seed(0)
    x = torch.randn(1, batch.tokens, cfg.text.hidden_size)
    t = cfg.text
    cos, sin = mrope_cos_sin(
        batch.position_ids, t.head_dim, t.rope_theta, t.mrope_section, torch.float32
    )
    got = box_attention_nll(attn, x, cos, sin, plan, heads=[0, 1])
    # reference: every head's full attention matrix, packed samples kept apart, causal
    T, D = batch.tokens, t.head_dim
    q = attn.q_proj(x).view(T, t.num_attention_heads, D).transpose(0, 1)
    k = attn.k_proj(x).view(T, t.num_key_value_heads, D).transpose(0, 1)
    q = qwen2vl.model.rope.apply_rotary(q, cos, sin)
    k = qwen2vl.model.rope.apply_rotary(k, cos, sin)
    k = k.repeat_interleave(t.num_attention_heads // t.num_key_value_heads, 0)
    sample = torch.repeat_interleave(torch.arange(2), torch.tensor([len(s.ids) for s in samples]))
    allowed = (sample[:, None] == sample[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
    weights = (q @ k.transpose(-1, -2) / D**0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
    want = 0.0
    for h in (0, 1):
        for i, qpos in enumerate(plan.queries.tolist()):
            want -= torch.log(weights[h, qpos][plan.target[i]].sum())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_training_moves_the_heads_attention_onto_the_box(tiny_ckpt, tmp_path, helpers):
    data = helpers.write_grounding(tmp_path, 16)
    objectives = [BoxAttention(1.0)]
    _, records = helpers.train_briefly(tiny_ckpt, data, tmp_path / "on", objectives=objectives)
    nll = [r["box_attention"] for r in records]
    assert all(v is not None for v in nll)
    first, last = np.mean(nll[:3]), np.mean(nll[-3:])
    assert last < 0.5 * first, (first, last)


def test_without_grounding_answers_training_is_unchanged(tiny_ckpt, make_data, tmp_path, helpers):
    data = make_data(6)
    off, _ = helpers.train_briefly(tiny_ckpt, data, tmp_path / "off")
    objectives = [BoxAttention(1.0)]
    on, records = helpers.train_briefly(tiny_ckpt, data, tmp_path / "on", objectives=objectives)
    assert on.losses == off.losses
    assert {r["box_attention"] for r in records} == {None}


@pytest.mark.parametrize("options", [{"weight": -1.0}, {"weight": float("nan")}, {"tokens": 0}])
def test_a_bad_weight_or_token_count_is_refused_on_construction(options):
    with pytest.raises(ConfigError):
        BoxAttention(**options)


def run_of(tiny_ckpt, *, world: int = 1, **options) -> Run:
    cfg = TrainConfig(model=str(tiny_ckpt), **options)
    return Run(cfg, D.DistEnv(world=world), qwen2vl.load_model(tiny_ckpt), data=None)


@pytest.mark.parametrize(
    "objective, world, options",
    [
        ({"layer": 2}, 1, {}),  # the tiny model has layers 0 and 1
        ({"heads": [2]}, 1, {}),  # and heads 0 and 1
        ({}, 1, {"gradient_checkpointing": True}),
        ({}, 2, {"strategy": "fsdp"}),
    ],
)
def test_settings_the_run_cannot_meet_are_refused_by_prepare(tiny_ckpt, objective, world, options):
    with pytest.raises(ConfigError):
        BoxAttention(1.0, **objective).prepare(run_of(tiny_ckpt, world=world, **options))


def test_prepare_defaults_to_the_middle_layer_and_one_head_per_key_value_group(tiny_ckpt):
    objective = BoxAttention(1.0)
    objective.prepare(run_of(tiny_ckpt, strategy="fsdp"))  # fsdp in one process: no sharding
    assert (objective.layer, objective.heads) == (1, [0])  # 2 layers; 2 heads share 1 k/v head
