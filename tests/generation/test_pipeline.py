import numpy as np
import pytest
from PIL import Image
from tiny_qwen2vl import tiny_real_vocab_checkpoint

from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.generation.stop import StopStrings


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_real_vocab_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt, dtype="float32")


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "p.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
    return str(path)


def ask(picture, question="What is in the picture?"):
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": picture}, {"type": "text", "text": question}],
        }
    ]


def test_chat_equals_generate_on_the_processor_batch(pipe, picture):
    text = pipe.chat(ask(picture), max_new_tokens=12)
    ids = pipe.generate(pipe.processor(ask(picture)), max_new_tokens=12)[0]
    assert text == pipe.processor.decode(ids)
    assert text


def test_stream_deltas_join_to_the_full_answer(pipe, picture):
    full = pipe.chat(ask(picture), max_new_tokens=12)
    deltas = list(pipe.chat(ask(picture), stream=True, max_new_tokens=12))
    assert len(deltas) > 1 and "".join(deltas) == full


def test_stop_string_across_tokens_stops_and_is_not_emitted(pipe, picture):
    full = pipe.complete(ask(picture), max_new_tokens=16)
    assert len(full.text) > 6
    stop = full.text[3:7]  # very likely spans a token boundary; must stop either way
    out = pipe.complete(ask(picture), max_new_tokens=16, stop=[stop])
    assert out.text == full.text[: full.text.find(stop)]
    assert out.finish_reason == "stop" and full.finish_reason == "length"


def test_seeded_sampling_is_reproducible(pipe, picture):
    kw = dict(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert pipe.chat(ask(picture), **kw) == pipe.chat(ask(picture), **kw)


def test_second_turn_reuses_prefix_cache_and_vision_features(ckpt, picture):
    pipe = Pipeline.from_pretrained(ckpt, dtype="float32")
    calls = []
    encode = pipe.model.encode_visual
    pipe.model.encode_visual = lambda *a: calls.append(1) or encode(*a)
    first = pipe.complete(ask(picture), max_new_tokens=8)
    turn2 = ask(picture) + [
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "And the colours?"},
    ]
    second = pipe.complete(turn2, max_new_tokens=8)
    assert second.cached_tokens > first.prompt_tokens // 2
    assert len(calls) == 1  # the image was encoded once
    fresh = Pipeline.from_pretrained(ckpt, dtype="float32").complete(turn2, max_new_tokens=8)
    assert fresh.cached_tokens == 0 and fresh.token_ids == second.token_ids


def test_same_image_twice_in_one_prompt_is_encoded_once(ckpt, picture):
    pipe = Pipeline.from_pretrained(ckpt, dtype="float32")
    calls = []
    encode = pipe.model.encode_visual
    pipe.model.encode_visual = lambda *a: calls.append(1) or encode(*a)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": picture},
                {"type": "image", "image": picture},
                {"type": "text", "text": "Same?"},
            ],
        }
    ]
    assert pipe.chat(messages, max_new_tokens=4)
    assert len(calls) == 1


def test_logprobs_and_usage(pipe, picture):
    out = pipe.complete(ask(picture), max_new_tokens=5, logprobs=True)
    assert len(out.logprobs) == len(out.token_ids) == 5
    assert all(lp <= 0 for lp in out.logprobs)
    assert out.prompt_tokens == pipe.processor(ask(picture))["input_ids"].shape[1]


def test_int8_pipeline_runs(ckpt, picture):
    pipe = Pipeline.from_pretrained(ckpt, dtype="bfloat16", quantize="int8")
    assert pipe.chat(ask(picture), max_new_tokens=4)


def test_stop_strings_hold_back_possible_prefixes():
    s = StopStrings(["</end>"])
    assert s.push("abc</") == "abc"
    assert s.push("en") == ""
    assert s.push("x") == "</enx"
    assert s.push("yy</end>zz") == "yy" and s.stopped
    t = StopStrings(["###"])
    assert t.push("a#") == "a" and t.flush() == "#"


def test_kv_cache_is_reused_in_place_when_large_enough(ckpt, picture):
    pipe = Pipeline.from_pretrained(ckpt, dtype="float32")
    pipe.complete(ask(picture), max_new_tokens=64)
    cache = pipe.session.cache
    pipe.complete(ask(picture, "Again?"), max_new_tokens=4)
    assert pipe.session.cache is cache


def test_a_different_image_with_the_same_token_count_is_not_taken_from_the_cache(ckpt, tmp_path):
    paths = []
    for seed in (1, 2):
        path = tmp_path / f"{seed}.png"
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    pipe = Pipeline.from_pretrained(ckpt, dtype="float32")
    pipe.complete(ask(paths[0]), max_new_tokens=4)
    again = pipe.complete(ask(paths[1]), max_new_tokens=8)
    fresh = Pipeline.from_pretrained(ckpt, dtype="float32").complete(
        ask(paths[1]), max_new_tokens=8
    )
    assert again.token_ids == fresh.token_ids
    pads = pipe.processor.tokenizer.image_pad_id
    first_pad = pipe.processor(ask(paths[1]))["input_ids"][0].tolist().index(pads)
    assert again.cached_tokens == first_pad  # the shared text before the image is still reused
