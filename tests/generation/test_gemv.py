import logging
import os
import platform

import pytest
import torch
from int8_activations import half_steps, int8_activations

from qwen2vl.generation import gemv
from qwen2vl.generation.quantize import quantize_per_channel

needs_kernel = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the kernel is built for x86-64 only"
)


@needs_kernel
def test_kernel_builds_on_this_machine():
    assert gemv.available()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])
@pytest.mark.parametrize("k", [64, 70, 9000])  # 70, 9000: a scalar tail; 9000 with rows: R=4
@pytest.mark.parametrize("n", [1, 7, 130])  # not multiples of the 4-row tile
def test_bf16_matches_float64(rows, k, n):
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randn(n, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    want = x.double() @ w.double().T + b.double()
    got = gemv.linear(x, w, bias=b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    # float32 accumulation, then one bf16 rounding of the result
    tol = 2**-8 * want.abs() + 1e-4 * k**0.5
    assert ((got.double() - want).abs() <= tol).all()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 4, 6, 16])
@pytest.mark.parametrize("k", [32, 1536, 8960])
@pytest.mark.parametrize("n", [1, 7, 130])  # not multiples of the 4-row tile
def test_int8_matches_float64_of_int8_activations(rows, k, n):
    g = torch.Generator().manual_seed(rows * k + n)
    x = torch.randn(rows, k, generator=g)
    q, scales = quantize_per_channel(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g)
    w = q.double() * scales.double()[:, None]
    want = int8_activations(x, k, gemv.INT8_GROUP) @ w.T + bias.double()
    got = gemv.linear(x, q, scales, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    # integer dot products per group are exact; what remains is float32 sums over the groups
    assert ((got.double() - want).abs() <= 1e-5 * want.abs().max() + 1e-5).all()
    # against the exact activations: each x moves at most half an int8 step of its group
    exact = x.double() @ w.T + bias.double()
    bound = half_steps(x, k, gemv.INT8_GROUP) @ w.abs().view(n, -1, gemv.INT8_GROUP).sum(-1).T
    assert ((got.double() - exact).abs() <= bound + 1e-5 * exact.abs().max() + 1e-5).all()


@needs_kernel
def test_python_knows_the_kernels_activation_group():
    assert gemv._load().INT8_GROUP == gemv.INT8_GROUP


@needs_kernel
def test_int8_weights_of_minus_128_multiply_exactly():
    # quantize.py writes |q| <= 127; a checkpoint's -128 still multiplies right (|w| as unsigned)
    x = torch.ones(1, 64)
    q = torch.full((4, 64), -128, dtype=torch.int8)
    got = gemv.linear(x, q, torch.ones(4))
    assert torch.equal(got, torch.full((1, 4), -128.0 * 64))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [96, 70])  # 70: not whole groups of 32, widened to float32
def test_int8_applies_per_channel_scales_and_bias(dtype, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 3, k, generator=g).to(dtype)  # leading dims are kept
    q, scales = quantize_per_channel(torch.randn(33, k, generator=g))
    bias = torch.randn(33, generator=g)
    want = x.double() @ (q.double() * scales.double()[:, None]).T + bias.double()
    got = gemv.linear(x, q, scales.to(dtype), bias.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 3, 33)
    rel = (got.double() - want).abs().max() / want.abs().max()
    # int8 activations: within about a percent; float32 activations and weights: exact sums
    assert rel < (1e-2 if dtype != torch.float32 or k % gemv.INT8_GROUP == 0 else 1e-6)


def test_fits_only_cpu_decode_rows_of_supported_dtypes():
    w = torch.zeros(8, 32, dtype=torch.bfloat16)
    few = torch.zeros(gemv.MAX_ROWS, 32, dtype=torch.bfloat16)
    many = torch.zeros(gemv.MAX_ROWS + 1, 32, dtype=torch.bfloat16)
    assert gemv.fits(few, w)
    assert gemv.fits(few, w.to(torch.int8))
    assert not gemv.fits(many, w)
    assert not gemv.fits(few, w.float())  # float32 weights: PyTorch's kernels
    assert not gemv.fits(few, w.t().contiguous().t())  # a transposed view


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("QWEN2VL_KERNELS", "0")
    gemv._load.cache_clear()
    try:
        assert not gemv.available()
    finally:
        monkeypatch.undo()
        gemv._load.cache_clear()


@needs_kernel
def test_a_failed_build_falls_back_with_one_logged_warning(monkeypatch, tmp_path, caplog):
    def no_compiler(name, directory):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there
    monkeypatch.setattr(gemv, "_build", no_compiler)
    gemv._load.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="qwen2vl.generation.gemv"):
            assert not gemv.available()
            assert not gemv.available()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    finally:
        monkeypatch.undo()
        gemv._load.cache_clear()


def test_the_build_finds_pip_ninja_through_a_copy_of_the_environment():
    ninja = pytest.importorskip("ninja")
    before = dict(os.environ)
    env = gemv._build_env()
    assert env["PATH"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert dict(os.environ) == before


@pytest.mark.slow
@needs_kernel
def test_a_fresh_build_leaves_this_process_environment_alone(monkeypatch, tmp_path, capfd):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    before = dict(os.environ)
    gemv._load.cache_clear()
    try:
        assert gemv.available()
        assert dict(os.environ) == before
        assert list(tmp_path.glob("qwen2vl_gemv_*/qwen2vl_gemv_*.so"))
        assert capfd.readouterr() == ("", "")
    finally:
        monkeypatch.undo()
        gemv._load.cache_clear()
