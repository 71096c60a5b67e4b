"""DecoderTaps: one forward call hands out each tapped layer's attention input and output, the
values the decoder computes (and in its autograd graph), and leaves nothing behind."""

import torch
from tiny_qwen2vl import IMAGE, VEND, VSTART, tiny_model

from qwen2vl.model.rope import mrope_cos_sin
from qwen2vl.model.text import DecoderTaps

PATCH = 3 * 2 * 14 * 14


def image_prompt():
    """One 4 x 4-patch image (4 merged tokens) between text: M-RoPE positions, not 1-D ones."""
    ids = torch.tensor([[1, 2, VSTART] + [IMAGE] * 4 + [VEND, 3, 4, 5]])
    grid = torch.tensor([[1, 4, 4]])
    pixels = torch.randn(16, PATCH, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels, "image_grid_thw": grid}


def by_hand(model, inputs):
    """Each layer's (attention input, cos, sin, output), running the layers one by one."""
    ids, grid = inputs["input_ids"], inputs["image_grid_thw"]
    x = model.embed(ids, model.encode_visual(inputs["pixel_values"], grid))
    positions, _ = model.positions(ids, image_grid_thw=grid)
    t = model.cfg.text
    cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_section, x.dtype)
    out = []
    for layer in model.model.layers:
        h = layer.input_layernorm(x)
        x = layer(x, cos, sin)
        out.append((h, cos, sin, x))
    return out


def test_taps_receive_each_layers_attention_input_and_output():
    model = tiny_model()
    inputs = image_prompt()
    seen = {}
    taps = DecoderTaps()
    for i in range(model.cfg.text.num_hidden_layers):
        taps.attention_input[i] = lambda x, cos, sin, i=i: seen.setdefault(("in", i), (x, cos, sin))
        taps.layer_output[i] = lambda h, i=i: seen.setdefault(("out", i), h)
    plain = model(**inputs).logits
    tapped = model(**inputs, taps=taps).logits
    torch.testing.assert_close(tapped, plain, rtol=0, atol=0)  # taps only look
    assert len(seen) == 2 * model.cfg.text.num_hidden_layers
    for i, (h, cos, sin, out) in enumerate(by_hand(model, inputs)):
        got_h, got_cos, got_sin = seen["in", i]
        torch.testing.assert_close(got_h, h, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_cos, cos, rtol=0, atol=0)
        torch.testing.assert_close(got_sin, sin, rtol=0, atol=0)
        torch.testing.assert_close(seen["out", i], out, rtol=1e-6, atol=1e-6)


def test_a_loss_on_a_tapped_value_back_propagates_into_the_layers_before_it():
    model = tiny_model().train()
    inputs = image_prompt()
    losses = []
    taps = DecoderTaps(layer_output={0: lambda h: losses.append(h.pow(2).mean())})
    model(**inputs, taps=taps)
    (loss,) = losses
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    by_hand(model, inputs)[0][3].pow(2).mean().backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and "model.layers.0.mlp.up_proj.weight" in got
    assert not any(n.startswith("model.layers.1") for n in got)  # after the tap: untouched
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_only_the_tapped_layers_are_called_and_nothing_stays_on_the_modules():
    model = tiny_model()
    calls = []
    taps = DecoderTaps(layer_output={1: lambda h: calls.append(h.shape)})
    model(**image_prompt(), taps=taps)
    model(**image_prompt())  # a later call without taps hands out nothing
    assert calls == [torch.Size([1, 11, model.cfg.text.hidden_size])]
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks)
