"""The prefix cache: a prompt whose leading blocks were prefilled before reuses their keys and
values, answers as without it, and never reuses across different media."""

from __future__ import annotations

import pytest
import torch
from engine_steps import engine_for, run_until_done, submit

from qwen2vl.generation.pipeline import Pipeline
from qwen2vl.serve.prefix_cache import BLOCK, PrefixCache, block_hashes, visual_starts


@pytest.fixture(scope="module")
def pipe(ckpt):
    return Pipeline.from_pretrained(ckpt, dtype="float32")


def with_image(path, text="What is in this picture, described in detail?"):
    system = {"role": "system", "content": "You are a careful assistant. " * 4}
    user = {"role": "user", "content": [{"type": "image", "image": str(path)},
                                        {"type": "text", "text": text}]}  # fmt: skip
    return [system, user]


def ask(engine, pipe, messages, n=6):
    out = submit(engine, pipe, messages, max_new_tokens=n)
    run_until_done(engine, [out])
    return out


def test_a_repeated_prompt_reuses_its_whole_blocks_and_answers_the_same(pipe, tmp_path, helpers):
    helpers.picture(1).save(tmp_path / "a.png")
    messages = with_image(tmp_path / "a.png")
    P = len(pipe.processor.encode(messages, add_generation_prompt=True).ids)
    plain = ask(engine_for(pipe, max_model_len=512, prefix_cache_mb=0), pipe, messages)
    engine = engine_for(pipe, max_model_len=512)
    first, again = ask(engine, pipe, messages), ask(engine, pipe, messages)
    assert first.finish.reason == again.finish.reason == "length"
    assert first.tokens == again.tokens == plain.tokens
    # the second prefilled only what follows the last whole block before its final token
    prompt = engine.metrics.prompt_tokens_total
    assert prompt == P + (P - (P - 1) // BLOCK * BLOCK)
    assert engine.metrics.prefix_hit_tokens == (P - 1) // BLOCK * BLOCK
    assert engine.metrics.prefix_queried_tokens == 2 * P


def test_an_image_differing_in_one_pixel_reuses_only_the_blocks_before_it(pipe, tmp_path, helpers):
    image = helpers.picture(2)
    image.save(tmp_path / "a.png")
    image.putpixel((5, 7), (0, 0, 0) if image.getpixel((5, 7)) != (0, 0, 0) else (255, 255, 255))
    image.save(tmp_path / "b.png")
    first, second = with_image(tmp_path / "a.png"), with_image(tmp_path / "b.png")
    enc = pipe.processor.encode(second, add_generation_prompt=True)
    assert enc.ids == pipe.processor.encode(first, add_generation_prompt=True).ids  # same text
    start = visual_starts(enc.ids, {pipe.processor.tokenizer.image_pad_id})[0]
    engine = engine_for(pipe, max_model_len=512)
    ask(engine, pipe, first)
    hits = engine.metrics.prefix_hit_tokens
    out = ask(engine, pipe, second)
    assert engine.metrics.prefix_hit_tokens - hits == start // BLOCK * BLOCK  # before the image
    alone = ask(engine_for(pipe, max_model_len=512, prefix_cache_mb=0), pipe, second)
    assert out.tokens == alone.tokens


def test_hashes_change_from_the_block_holding_a_visual_on():
    ids = list(range(100))
    a = block_hashes(ids, [(40, "key-a")])
    b = block_hashes(ids, [(40, "key-b")])
    assert len(a) == 100 // BLOCK
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:], strict=True))
    assert block_hashes(ids, [(40, "key-a")]) == a
    assert block_hashes(ids[:50] + [0] + ids[51:], [(40, "key-a")])[3] != a[3]


def test_visual_starts_find_each_run_of_placeholders():
    assert visual_starts([1, 9, 9, 9, 2, 3, 9, 9, 8, 8, 4], {9, 8}) == [1, 6, 8]


def test_memory_stays_bounded_and_the_least_recent_prompt_goes_first():
    L, K, D = 2, 1, 4
    block_bytes = 2 * L * K * BLOCK * D * 4
    cache = PrefixCache(max_bytes=5 * block_bytes)

    def kv(n, fill):
        return torch.full((L, K, n * BLOCK, D), float(fill)), torch.full((L, K, n * BLOCK, D), -1.0)

    first = block_hashes(list(range(3 * BLOCK)), [])
    second = block_hashes(list(range(100, 100 + 3 * BLOCK)), [])
    cache.store(first, *kv(3, 1))
    assert cache.match(first) == 3
    cache.store(second, *kv(3, 2))
    assert cache.bytes <= 5 * block_bytes and cache.match(second) == 3
    assert cache.match(first) == 2  # its last blocks went first: its head is still usable
    k, v = cache.load(second)
    assert k.shape == (L, K, 3 * BLOCK, D) and (k == 2).all() and (v == -1).all()
    huge = block_hashes(list(range(200, 200 + 9 * BLOCK)), [])
    cache.store(huge, *kv(9, 3))  # more than the bound: its leading blocks that fit
    assert cache.match(huge) == 5 and cache.bytes == 5 * block_bytes
