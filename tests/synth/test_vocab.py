"""Lumped zero rows: the same loss and gradients as the full vocabulary, zero rows left alone."""

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from tiny_qwen2vl import tiny_config
from tiny_train import one_thread  # noqa: F401 (autouse: tiny matmuls run faster on one thread)

import qwen2vl
from qwen2vl.errors import ConfigError
from qwen2vl.model.text import DecoderTaps
from qwen2vl.synth.vocab import (
    LiveRows,
    LumpedVocab,
    data_token_ids,
    lumped_inputs,
    lumped_loss_sum,
    scored_rows,
    zero_unused_rows,
)
from qwen2vl.train import SampleList, TrainConfig, train
from qwen2vl.train import distributed as D
from qwen2vl.train.init import init_model
from qwen2vl.train.objective import Run
from qwen2vl.train.packing import collate, loss_sum, target_positions


def zero_unused(model, samples) -> torch.Tensor:
    """Zero the rows of the tokens no sample holds; returns which rows those are."""
    used = {i for s in samples for i in s.ids}
    zero_unused_rows(model, used)
    unused = torch.ones(model.cfg.text.vocab_size, dtype=torch.bool)
    unused[sorted(used)] = False
    return unused


def loss_and_grads(model, batch, lumped: bool):
    """The summed token loss of a packed row as the trainer takes it (LumpedVocab's way or the
    full vocabulary's) and every parameter's gradient."""
    model.zero_grad()
    keep = target_positions(batch.targets)
    inputs = batch.model_inputs()
    if lumped:
        run = Run(TrainConfig(), D.DistEnv(), model, data=None, engine=model)
        objective = LumpedVocab()
        objective.prepare(run)
        loss = objective.token_loss(run, inputs, keep, batch.targets[keep], DecoderTaps())
    else:
        loss = loss_sum(model(**inputs, logits_to_keep=keep).logits, batch.targets[keep])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def model64(tiny64, tie: bool):
    """The 64-token test model, its output rows tied to the embedding (as the 2B) or not."""
    if not tie:
        return tiny64.model()
    cfg = tiny64.config()
    torch.manual_seed(0)
    model = qwen2vl.Qwen2VL(replace(cfg, text=replace(cfg.text, tie_word_embeddings=True)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_lumped_loss_and_gradients_equal_the_full_vocabulary(tiny64, tie):
    model = model64(tiny64, tie)
    samples = tiny64.samples(4)
    unused = zero_unused(model, samples)
    assert 0 < int(unused.sum()) < len(unused)
    batch = collate(samples, model.cfg)
    full, full_grads = loss_and_grads(model, batch, lumped=False)
    lumped, lumped_grads = loss_and_grads(model, batch, lumped=True)
    torch.testing.assert_close(lumped, full, rtol=1e-6, atol=0)  # both float32 losses
    head = "model.embed_tokens.weight" if tie else "lm_head.weight"
    for name, grad in full_grads.items():
        want = grad.clone()
        if name == head:
            assert grad[unused].abs().sum() > 0  # the full softmax pushes the zero rows ...
            want[unused] = 0  # ... which the lumped loss leaves at zero
        torch.testing.assert_close(lumped_grads[name], want, rtol=1e-4, atol=1e-5, msg=name)


def test_rows_that_have_trained_or_occur_in_the_batch_are_scored():
    weight = torch.zeros(10, 3)
    weight[[2, 7]] = 1.0
    rows = scored_rows(weight, torch.tensor([[7, 4, 4]]))
    assert rows.tolist() == [2, 4, 7]
    logits = torch.randn(1, 2, 3)
    with pytest.raises(ValueError, match="not among the scored rows"):
        lumped_loss_sum(logits, torch.tensor([4, 5]), rows, 10)
    # no zero rows left: nothing to lump, a plain cross-entropy
    every = torch.arange(3)
    got = lumped_loss_sum(logits, torch.tensor([0, 2]), every, 3)
    want = torch.nn.functional.cross_entropy(logits[0], torch.tensor([0, 2]), reduction="sum")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("tie", [False, True])
def test_logits_of_some_rows_equal_those_columns_of_the_full_logits(tiny64, tie):
    """lumped_inputs' embeddings and rows, through the model's hidden states, give the full
    logits' columns `rows`. Tied, the input embedding reads the rows gathered for the logits when
    they hold every input id, and the whole table when they do not (or when there are none)."""
    model = model64(tiny64, tie).eval()
    inputs = collate(tiny64.samples(2), model.cfg).model_inputs()
    positions = {k: v for k, v in inputs.items() if not k.startswith("pixel_values")}
    with torch.no_grad():
        full = model(**inputs).logits
        every = torch.unique(inputs["input_ids"])
        for rows in (every, every[1:], torch.tensor([3, 9]), every[:0]):
            embeds, head = lumped_inputs(model, inputs, rows)
            hidden = model(**positions, inputs_embeds=embeds, return_hidden=True).hidden
            got = F.linear(hidden, head)
            torch.testing.assert_close(got, full[..., rows], rtol=1e-5, atol=1e-5)


def test_live_rows_score_what_re_reading_the_table_would():
    weight = torch.zeros(10, 3)
    weight[[2, 7]] = 1.0
    live = LiveRows(weight)
    batches = [torch.tensor([[7, 4, 4]]), torch.tensor([[1, 8]])]  # one step's two rows
    for ids in batches:
        assert live.rows(ids).tolist() == scored_rows(weight, ids).tolist()
    weight[4] = 0.5  # the step moved row 4; rows 1 and 8 took no step (still zero)
    live.update(weight, D.DistEnv())
    for ids in (torch.tensor([[3]]), torch.tensor([[8]])):
        assert live.rows(ids).tolist() == scored_rows(weight, ids).tolist()
    assert live.rows(torch.tensor([[3]])).tolist() == [2, 3, 4, 7]


def test_training_with_lumped_rows_learns_and_leaves_unused_rows_at_zero(tiny64, tmp_path):
    samples = tiny64.samples(8)
    runs = {}
    for lump in (False, True):
        model = tiny64.model()
        unused = zero_unused(model, samples)
        cfg = TrainConfig(
            output=str(tmp_path / str(lump)), stage=3, max_steps=40, lr=1e-2, warmup_steps=5,
            max_tokens=512,
        )  # fmt: skip
        objectives = [LumpedVocab()] if lump else []
        runs[lump] = train(cfg, model=model, data=SampleList(samples), objectives=objectives).losses
        rows = model.lm_head.weight.detach()
        assert bool((rows[unused] == 0).all()) == lump
        assert bool((rows[~unused] != 0).any(1).all())
    full, lumped = runs[False], runs[True]
    assert lumped[0] == pytest.approx(full[0], rel=1e-5)  # same weights, same loss
    assert lumped[-1] < 0.05 and full[-1] < 0.05


def test_lumping_is_refused_with_fsdp(tiny64):
    cfg = TrainConfig(strategy="fsdp")
    with pytest.raises(ConfigError, match="fsdp"):
        LumpedVocab().prepare(Run(cfg, D.DistEnv(world=2), tiny64.model(), data=None))


@pytest.mark.parametrize("tie", [False, True])
def test_zeroing_unused_rows_keeps_the_draw_of_the_tokens_the_data_holds(tmp_path, helpers, tie):
    arch = tmp_path / "arch"
    arch.mkdir()
    cfg = tiny_config(tie=tie, real_vocab=True)
    (arch / "config.json").write_text(json.dumps(cfg.to_hf()))
    data = helpers.write_dataset(tmp_path, n=3)
    processor = qwen2vl.load_processor(arch)
    ids = data_token_ids([data], processor)
    tok = processor.tokenizer
    assert tok.image_pad_id in ids and set(tok.encode("Number 2.")) <= ids
    lines = data.read_text().splitlines()
    assert ids == {i for line in lines for i in encoded(line, processor, data.parent)}

    model, ref = zero_unused_rows(init_model(cfg, seed=3), ids), init_model(cfg, seed=3)
    used = torch.zeros(cfg.text.vocab_size, dtype=torch.bool)
    used[sorted(ids)] = True
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        rows, drawn = model.get_parameter(name), ref.get_parameter(name)
        assert bool((rows[~used] == 0).all()) and torch.equal(rows[used], drawn[used]), name
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values(), strict=True):
        if "embed_tokens" not in name and "lm_head" not in name:
            assert torch.equal(p, q), name  # the other weights: the same draw


def test_ids_outside_the_vocabulary_or_a_bad_line_are_value_errors(tmp_path, tiny64):
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        zero_unused_rows(tiny64.model(), {3, 64})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": "not a list"}) + "\n")
    processor = qwen2vl.load_processor(None)
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected"):
        data_token_ids([bad], processor)


def encoded(line: str, processor, base) -> list[int]:
    """The ids training reads for one line (pads expanded: the same id many times)."""
    from qwen2vl.train.data import encode_conversation, resolve_media

    messages = resolve_media(json.loads(line)["messages"], base)
    return encode_conversation(messages, processor).ids
