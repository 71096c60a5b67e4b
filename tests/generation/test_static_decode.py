"""The static decode step (fixed shapes, CUDA-graph capturable) against the dynamic one.

On CPU the step runs eagerly: its logits and greedy tokens must equal the dynamic path's, and
what a CUDA graph needs is checked by recording every op the step dispatches across steps."""

import copy

import pytest
import torch
from tiny_qwen2vl import IMAGE, VEND, VSTART, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from qwen2vl.errors import Qwen2VLError
from qwen2vl.generation.generate import Generator, generate
from qwen2vl.generation.kv_cache import KVCache
from qwen2vl.generation.sampling import SamplingParams
from qwen2vl.generation.static_decode import StaticDecoder, StaticKVCache, decode_step


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def left_padded(rows, images=()):
    """A processor-like batch: rows of ids left-padded with 0; images: grid_thw of each image."""
    T = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.tensor([[0] * (T - len(r)) + r for r in rows]),
        "attention_mask": torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]),
    }
    if images:
        n = sum(t * h * w for t, h, w in images)
        batch["pixel_values"] = torch.randn(n, 1176, generator=torch.Generator().manual_seed(0))
        batch["image_grid_thw"] = torch.tensor(images)
    return batch


def image_row(n):  # n image tokens = an (h, w) grid of n * 4 patches after the 2x2 merge
    return [5, 6, VSTART] + [IMAGE] * n + [VEND, 7, 8]


CASES = {
    "text_1": left_padded([[3, 1, 4, 1, 5, 9, 2]]),
    "text_3_ragged": left_padded([[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5], [8, 9, 7, 9, 3]]),
    "image_1": left_padded([image_row(4)], [[1, 4, 4]]),
    "image_3_ragged": left_padded(
        [image_row(4), [11, 12, 13], [9] + image_row(6)], [[1, 4, 4], [1, 4, 6]]
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_static_step_logits_equal_the_dynamic_path(model, case):
    params = SamplingParams(max_new_tokens=8)
    dyn = Generator.start(model, CASES[case], params, stop_token_ids=[], static=False)
    sta = Generator.start(model, CASES[case], params, stop_token_ids=[], static=True)
    assert dyn.decoder is None and sta.decoder is not None
    for a, b in zip(dyn, sta, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert (dyn.logits - sta.logits).abs().max() <= 1e-5
    assert sta.cache.length == dyn.cache.length
    L = dyn.cache.length  # the cache holds the same keys/values (the pipeline reuses it)
    assert (dyn.cache.k[..., :L, :] - sta.cache.k[..., :L, :]).abs().max() <= 1e-5


@pytest.mark.parametrize("case", ["text_3_ragged", "image_3_ragged"])
def test_greedy_tokens_identical_over_20_steps(model, case):
    params = SamplingParams(max_new_tokens=20)
    dyn = generate(model, CASES[case], params, stop_token_ids=[], static=False)
    sta = generate(model, CASES[case], params, stop_token_ids=[], static=True)
    assert sta == dyn and all(len(r) == 20 for r in sta)


def test_rows_of_different_lengths_without_padding(model):
    """The server's layout: each row's tokens start at column 0 and rows end at their own
    length; the step writes each row at its own column and masks the columns past it."""
    rows = [[3, 1, 4], [1, 5, 9, 2, 6, 5, 3, 5], [8, 9, 7, 9, 3]]
    cache = KVCache(model.cfg.text, 3, 16, dtype=torch.float32)
    want = []
    for b, r in enumerate(rows):
        one = KVCache(model.cfg.text, 1, 16, dtype=torch.float32)
        ids = torch.tensor([r + [42]])
        with torch.no_grad():
            want.append(model(ids, kv_cache=one).logits[0, -1])  # the last token's logits
        cache.k[:, b, :, : len(r)] = one.k[:, 0, :, : len(r)]
        cache.v[:, b, :, : len(r)] = one.v[:, 0, :, : len(r)]
    decoder = StaticDecoder(model, cache)
    lengths = torch.tensor([len(r) for r in rows])
    got = decoder(torch.full((3, 1), 42), lengths.view(1, 3, 1).expand(3, 3, 1), lengths)
    assert (got - torch.stack(want)).abs().max() <= 1e-5


class OpRecorder(TorchDispatchMode):
    """Every aten op the step dispatches, with the shapes, dtypes and devices of its tensors."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = torch.utils._pytree.tree_leaves((args, kwargs, out))
        sig = [
            (tuple(t.shape), t.dtype, t.device.type) for t in flat if isinstance(t, torch.Tensor)
        ]
        self.ops.append((str(func), sig))
        return out


def test_step_is_capturable_same_ops_same_shapes_no_host_reads(model):
    """What capture needs, checked on CPU: (1) steps at different lengths, tokens and positions
    dispatch the same ops on tensors of the same shapes (no growing tensors, no branch on data);
    (2) no op reads a tensor into Python (``.item()``, ``bool(t)``: aten._local_scalar_dense);
    (3) the decoder's Python state does not change between steps."""
    batch = CASES["image_3_ragged"]
    gen = Generator.start(model, batch, SamplingParams(max_new_tokens=8), stop_token_ids=[])
    decoder = StaticDecoder(model, gen.cache)
    decoder.set_valid(batch["attention_mask"])
    python_state = {k: v for k, v in vars(decoder).items() if not isinstance(v, torch.Tensor)}
    traces = []
    for step in range(3):
        ids = torch.tensor([[7 + step], [30 * step], [255 - step]])
        pos = torch.tensor([10 + step, 4 + step, 20 + step]).view(1, 3, 1).expand(3, 3, 1)
        lengths = torch.full((3,), gen.cache.length + step)
        with OpRecorder() as rec:
            decoder(ids, pos, lengths)
        traces.append(rec.ops)
    assert traces[0] == traces[1] == traces[2]
    assert not any("_local_scalar_dense" in op or "item" in op for op, _ in traces[0])
    assert {k: v for k, v in vars(decoder).items() if k in python_state} == python_state


def test_step_runs_on_tensors_without_data(model):
    """On the meta device tensors have shapes but no data, so any host read (``.item()``,
    ``.tolist()``, ``bool(t)``, a branch on a value) raises; the step also takes attention's
    non-CPU branch there, the SDPA one CUDA takes."""
    meta = copy.deepcopy(model).to("meta")
    cache = KVCache(meta.cfg.text, 3, 16, dtype=torch.float32, device="meta")
    decoder = StaticDecoder(meta, cache)
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.long, device="meta")  # noqa: E731
    logits = decoder(zeros(3, 1), zeros(3, 3, 1), zeros(3))
    assert logits.shape == (3, meta.cfg.text.vocab_size) and logits.is_meta


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
def test_step_traces_whole_under_torch_compile(model):
    """TorchDynamo captures the step as one graph (fullgraph: no graph break), so compiling it
    (e.g. mode="reduce-overhead") stays open; the traced step computes the same logits."""
    cache = KVCache(model.cfg.text, 2, 8, dtype=torch.float32)
    decoder = StaticDecoder(model, cache)
    decoder.lengths.copy_(torch.tensor([0, 3]))
    static = StaticKVCache(decoder.k, decoder.v, decoder.lengths)
    args = (decoder.ids, decoder.positions, decoder.valid)
    torch._dynamo.reset()
    traced = torch.compile(decode_step, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(traced(model, static, *args), decode_step(model, static, *args))


def test_static_decode_stops_at_a_full_cache(model):
    gen = Generator.start(
        model, CASES["text_1"], SamplingParams(max_new_tokens=4), stop_token_ids=[]
    )
    gen = Generator(
        model,
        gen.params,
        cache=gen.cache,
        logits=gen.logits,
        rope_deltas=gen.rope_deltas,
        n_real=gen.n_real,
        stop_token_ids=[],
        static=True,
    )
    gen.cache.commit(gen.cache.capacity - gen.cache.length)
    with pytest.raises(Qwen2VLError, match="KV cache full"):
        gen.step()


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_batch(dtype):
    batch = {k: v.cuda() for k, v in CASES["image_3_ragged"].items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return batch


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_the_eager_step(dtype):
    model = tiny_model().to("cuda", dtype)
    gen = Generator.start(
        model, cuda_batch(dtype), SamplingParams(max_new_tokens=6), stop_token_ids=[]
    )
    assert gen.decoder is not None  # static by default on CUDA
    for _ in gen:
        pass
    d = gen.decoder
    assert list(d.graphs) == [3]  # captured once, replayed for the other steps
    # Replay the last step on its own static inputs (it rewrites the same slot), then run the
    # same step eagerly: the graph launches the eager step's kernels, so the logits are equal.
    lengths = torch.full((3,), gen.cache.length - 1, device="cuda")
    replayed = d(d.ids[:3].clone(), d.positions[:, :3].clone(), lengths)
    with torch.inference_mode():
        assert torch.equal(replayed, d._step(3))


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_greedy_tokens_equal_the_dynamic_path():
    model = tiny_model().cuda()
    params = SamplingParams(max_new_tokens=20)
    dyn = Generator.start(model, cuda_batch(torch.float32), params, stop_token_ids=[], static=False)
    sta = Generator.start(model, cuda_batch(torch.float32), params, stop_token_ids=[], static=True)
    for a, b in zip(dyn, sta, strict=True):
        assert torch.equal(a.tokens, b.tokens)
        assert (dyn.logits - sta.logits).abs().max() <= 1e-5
