"""The engine against the reference: greedy (and seeded) output equals Pipeline's for the same
messages, however requests overlap; the scheduler interleaves prefill chunks with decode steps,
and frees slots at once."""

from __future__ import annotations

import pytest
import torch
from engine_steps import Collected, engine_for, run_until_done, submit

from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.serve.engine import QueueFull
from qwen2vl.serve.sequence import Request


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt, dtype="float32")


@pytest.fixture(scope="module")
def image(tmp_path_factory, helpers):
    path = tmp_path_factory.mktemp("engine") / "p.png"
    helpers.picture(3).save(path)
    return str(path)


def reference(pipe, messages, **sampling):
    """Pipeline's answer as a first turn (its multi-turn prefix reuse must not carry over)."""
    pipe.session = None
    return pipe.complete(messages, **sampling)


def conversations(image):
    return [
        ([{"role": "user", "content": "Short"}], 40),
        ([{"role": "user", "content": [{"type": "image", "image": image},
                                       {"type": "text", "text": "What is it?"}]}], 16),
        ([{"role": "user", "content": "word " * 150}], 20),  # several prefill chunks
        ([{"role": "user", "content": "Hello there, how are you doing today?"}], 12),
        ([{"role": "user", "content": "Another one, with a different length."}], 15),
    ]  # fmt: skip


def test_greedy_equals_pipeline_with_overlapping_requests(pipe, image):
    # 2 slots for 5 requests: admissions happen mid-decode; a small slack forces compaction.
    engine = engine_for(pipe, max_num_seqs=2, max_model_len=200, prefill_chunk=32, kv_slack=1)
    convs = conversations(image)
    outs = [submit(engine, pipe, m, max_new_tokens=n) for m, n in convs]
    run_until_done(engine, outs)
    for (messages, n), out in zip(convs, outs, strict=True):
        ref = reference(pipe, messages, max_new_tokens=n)
        assert out.tokens == ref.token_ids and out.text == ref.text
        assert out.finish.reason == ref.finish_reason and out.finish.completion_tokens == n
    assert engine.cache.compactions >= 1
    assert engine.stats() == {"waiting": 0, "running": 0, "free_slots": 2, "encoder_cache_items": 1}


def test_seeded_sampling_penalty_and_stop_strings_equal_pipeline(pipe, image):
    engine = engine_for(pipe, max_num_seqs=3, max_model_len=512)
    messages = conversations(image)[1][0]
    settings = [
        dict(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=50, seed=7),
        dict(max_new_tokens=8, repetition_penalty=1.3),
    ]
    full = reference(pipe, messages, max_new_tokens=12)
    settings.append(dict(max_new_tokens=12, stop=[full.text[5:9]]))
    outs = [submit(engine, pipe, messages, **s) for s in settings]
    run_until_done(engine, outs)
    for s, out in zip(settings, outs, strict=True):
        ref = reference(pipe, messages, **s)
        assert out.text == ref.text and out.finish.reason == ref.finish_reason, s
    assert outs[2].finish.reason == "stop"


def test_prefill_is_chunked_between_decode_steps(pipe):
    engine = engine_for(pipe, max_num_seqs=2, max_model_len=512, prefill_chunk=16)
    running = submit(engine, pipe, [{"role": "user", "content": "hi"}], max_new_tokens=100)
    engine.step()  # admits it (one chunk)...
    engine.step()  # ...and its first decode step
    before = len(running.tokens)
    late = submit(engine, pipe, [{"role": "user", "content": "long " * 120}], max_new_tokens=3)
    chunks = -(-len(pipe.processor.encode([{"role": "user", "content": "long " * 120}]).ids) // 16)
    for step in range(chunks):
        engine.step()
        # one prefill chunk per step, and every step still gave the running stream a token;
        # the step that runs the last chunk admits the request into that step's decode
        assert len(running.tokens) == before + step + 1
        assert len(late.tokens) == (step == chunks - 1)
    assert engine.stats()["running"] == 2 and chunks >= 5


def test_a_burst_of_short_prompts_is_admitted_in_one_step(pipe):
    engine = engine_for(pipe, max_num_seqs=4, max_model_len=256, prefill_chunk=128)
    outs = [submit(engine, pipe, [{"role": "user", "content": f"hi {i}"}], max_new_tokens=5)
            for i in range(5)]  # fmt: skip
    engine.step()  # ~20 tokens each: four fit one chunk's budget; the fifth waits for a slot
    assert [len(o.tokens) for o in outs] == [1, 1, 1, 1, 0]
    run_until_done(engine, outs)


def test_cancel_and_timeout_free_the_slot_at_once(pipe):
    engine = engine_for(pipe, max_num_seqs=1, max_model_len=256, max_queue=2)
    a = submit(engine, pipe, [{"role": "user", "content": "a"}], max_new_tokens=50)
    b = submit(engine, pipe, [{"role": "user", "content": "b"}], max_new_tokens=3)
    with pytest.raises(QueueFull):
        submit(engine, pipe, [{"role": "user", "content": "c"}], max_new_tokens=3)
    for _ in range(3):
        engine.step()
    assert a.tokens and not b.tokens
    seq_a = engine.rows[0]
    engine.cancel(seq_a)
    engine.step()  # a leaves, b is admitted in the same step
    assert a.finish.reason == "cancelled" and engine.rows[0].request.ids != seq_a.request.ids
    run_until_done(engine, [b])
    assert b.finish.reason == "length"
    enc = pipe.processor.encode([{"role": "user", "content": "slow"}])
    late = Collected()
    engine.submit(Request(enc.ids, params=SamplingParams(max_new_tokens=5), timeout_s=0.0), late)
    engine.step()
    assert late.finish.reason == "timeout" and "timeout" in late.finish.message
    assert engine.stats()["free_slots"] == 1 and engine.metrics.requests["cancelled"] == 1


def test_same_image_in_many_requests_is_encoded_once(pipe, image, monkeypatch):
    engine = engine_for(pipe, max_num_seqs=2, max_model_len=256)
    calls = []
    encode = pipe.model.encode_visual
    monkeypatch.setattr(pipe.model, "encode_visual", lambda *a: calls.append(1) or encode(*a))
    messages = conversations(image)[1][0]
    outs = [submit(engine, pipe, messages, max_new_tokens=2) for _ in range(3)]
    run_until_done(engine, outs)
    assert len(calls) == 1 and engine.metrics.encoder_hits == 2


def test_a_failing_prefill_fails_only_its_request(pipe):
    engine = engine_for(pipe, max_num_seqs=2, max_model_len=256)
    good = submit(engine, pipe, [{"role": "user", "content": "fine"}], max_new_tokens=4)
    bad = Collected()  # an image placeholder without its image: the model refuses it
    ids = pipe.processor.encode([{"role": "user", "content": "x"}]).ids
    ids = ids[:-3] + [pipe.processor.tokenizer.image_pad_id] + ids[-3:]
    engine.submit(Request(ids, params=SamplingParams(max_new_tokens=4)), bad)
    run_until_done(engine, [good, bad])
    assert bad.finish.reason == "error" and good.finish.reason == "length"
    assert torch.isfinite(engine.next_logits).all()


HEALTHY = [
    ([{"role": "user", "content": "Short"}], dict(max_new_tokens=12)),
    ([{"role": "user", "content": "Hello"}], dict(max_new_tokens=10, temperature=0.8, seed=5)),
    ([{"role": "user", "content": "Another"}], dict(max_new_tokens=8, repetition_penalty=1.3)),
]


def alone(pipe, messages, **sampling) -> Collected:
    engine = engine_for(pipe, max_num_seqs=4, max_model_len=256)
    out = submit(engine, pipe, messages, **sampling)
    run_until_done(engine, [out])
    return out


def start_beside_healthy(pipe, messages, **sampling):
    """An engine running one request beside HEALTHY, all of them past their first token."""
    engine = engine_for(pipe, max_num_seqs=4, max_model_len=256)
    poisoned = submit(engine, pipe, messages, **sampling)
    outs = [submit(engine, pipe, m, **s) for m, s in HEALTHY]
    engine.step()
    engine.step()
    assert all(out.tokens for out in [poisoned, *outs])
    seq = next(s for s in engine.rows if s.on_event is poisoned)
    return engine, seq, poisoned, outs


def assert_ends_alone(pipe, engine, poisoned, outs, message="non-finite"):
    run_until_done(engine, [poisoned, *outs])
    assert poisoned.finish.reason == "error" and message in poisoned.finish.message
    for (messages, sampling), out in zip(HEALTHY, outs, strict=True):
        ref = alone(pipe, messages, **sampling)
        assert out.tokens == ref.tokens and out.text == ref.text, sampling
        assert out.finish.reason == ref.finish.reason != "error"
    assert engine.stats() == {"waiting": 0, "running": 0, "free_slots": 4, "encoder_cache_items": 0}
    assert engine.metrics.requests["error"] == 1


def test_a_request_whose_sampling_goes_non_finite_ends_alone(pipe):
    messages = [{"role": "user", "content": "x"}]
    engine, seq, poisoned, outs = start_beside_healthy(
        pipe, messages, max_new_tokens=20, temperature=0.7
    )
    # Past validation: dividing the logits by it overflows them to inf, the softmax to NaN.
    seq.params.temperature = 1e-300
    assert_ends_alone(pipe, engine, poisoned, outs)


def test_a_request_whose_pick_raises_ends_alone(pipe):
    messages = [{"role": "user", "content": "x"}]
    engine, seq, poisoned, outs = start_beside_healthy(pipe, messages, max_new_tokens=20)

    def broken(logits, greedy_token):
        raise RuntimeError("boom")

    seq.choose = broken
    assert_ends_alone(pipe, engine, poisoned, outs, message="sampling failed: boom")


def test_a_request_whose_model_output_goes_nan_ends_alone_and_leaves_no_nan(pipe):
    # The longest prompt holds the earliest columns: the row moved into its slot when it ends
    # keeps the NaN ones it does not own, masked, until a longer prompt widens the window.
    messages = [{"role": "user", "content": "long " * 30}]
    engine, seq, poisoned, outs = start_beside_healthy(pipe, messages, max_new_tokens=20)
    cache = engine.cache
    assert seq.row != cache.n - 1 and cache.start[seq.row] == min(cache.start[: cache.n])
    cache.v[:, seq.row, :, cache.start[seq.row] : cache.col] = float("nan")  # a bf16 overflow
    run_until_done(engine, [poisoned])
    late_messages = [{"role": "user", "content": "longer " * 60}]
    late = submit(engine, pipe, late_messages, max_new_tokens=6)
    run_until_done(engine, [late, *outs])
    assert_ends_alone(pipe, engine, poisoned, outs)
    assert late.tokens == alone(pipe, late_messages, max_new_tokens=6).tokens
