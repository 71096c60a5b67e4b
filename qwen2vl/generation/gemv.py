"""A memory-bound matrix-vector kernel for decode on x86 CPUs (AVX2 + FMA), built on first use.

Decode multiplies 1-4 activation rows by every weight matrix once per token, so its speed is the
rate at which weights stream from memory. PyTorch's bf16 kernels on CPUs without bf16 units
widen each weight with slow generic code and reach a fraction of the memory bandwidth; this
kernel widens bf16 (a 16-bit shift) or int8 (with one scale per output channel) in registers
and fuses the multiply-add, so each weight byte is read once at close to bandwidth.

Built with torch.utils.cpp_extension (needs a C++ compiler and ninja) into the torch extensions
cache; when that is not possible, or the CPU lacks AVX2/FMA, ``available()`` is False and callers
keep PyTorch's kernels. Set QWEN2VL_NO_GEMV=1 to force that fallback.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 4

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

static inline __m256 widen_bf16(const uint16_t* p) {
  __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

static inline __m256 widen_i8(const int8_t* p) {
  __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
}

static inline float widen_scalar(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
static inline float widen_scalar(int8_t v) { return static_cast<float>(v); }

template <typename W, int M>
static void rows_kernel(const float* x, const W* w, const float* scale, float* y,
                        int64_t K, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * K;
    __m256 acc[M][2];
    for (int m = 0; m < M; ++m) {
      acc[m][0] = _mm256_setzero_ps();
      acc[m][1] = _mm256_setzero_ps();
    }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      __m256 w0, w1;
      if constexpr (std::is_same<W, uint16_t>::value) {
        w0 = widen_bf16(row + k);
        w1 = widen_bf16(row + k + 8);
      } else {
        w0 = widen_i8(row + k);
        w1 = widen_i8(row + k + 8);
      }
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[m][1]);
      }
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(_mm256_add_ps(acc[m][0], acc[m][1]));
      for (int64_t j = k; j < K; ++j) s += widen_scalar(row[j]) * x[m * K + j];
      y[m * N + n] = scale ? s * scale[n] : s;
    }
  }
}

template <typename W>
static torch::Tensor run(torch::Tensor x, const W* w, const float* scale, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows_kernel<W, 1>(xp, w, scale, yp, K, N, n0, n1); break;
      case 2: rows_kernel<W, 2>(xp, w, scale, yp, K, N, n0, n1); break;
      case 3: rows_kernel<W, 3>(xp, w, scale, yp, K, N, n0, n1); break;
      default: rows_kernel<W, 4>(xp, w, scale, yp, K, N, n0, n1); break;
    }
  });
  return y;
}

// x [M, K] float32, w [N, K] bfloat16 -> [M, N] float32
torch::Tensor gemv_bf16(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4 && x.size(1) == w.size(1));
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kBFloat16);
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous());
  return run<uint16_t>(x, reinterpret_cast<const uint16_t*>(w.data_ptr()), nullptr, w.size(0));
}

// x [M, K] float32, w [N, K] int8, scale [N] float32 -> [M, N] float32
torch::Tensor gemv_int8(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 4 && x.size(1) == w.size(1));
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kChar);
  TORCH_CHECK(scale.scalar_type() == torch::kFloat && scale.numel() == w.size(0));
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && scale.is_contiguous());
  return run<int8_t>(x, w.data_ptr<int8_t>(), scale.data_ptr<float>(), w.size(0));
}
"""


@lru_cache(maxsize=1)
def _extension():
    if os.environ.get("QWEN2VL_NO_GEMV") or torch.backends.cpu.get_cpu_capability() not in (
        "AVX2",
        "AVX512",
    ):
        return None
    try:
        from torch.utils.cpp_extension import load_inline

        return load_inline(
            name="qwen2vl_gemv",
            cpp_sources=_SOURCE,
            functions=["gemv_bf16", "gemv_int8"],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-std=c++17"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, unsupported platform: keep torch's kernels
        log.warning("decode kernel unavailable, using PyTorch's (%s)", str(e).splitlines()[0])
        return None


def available() -> bool:
    return _extension() is not None


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M<=4, K] float32 @ w[N, K] bfloat16 ^T -> [M, N] float32."""
    return _extension().gemv_bf16(x.contiguous(), w)


def gemv_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M<=4, K] float32 @ (w[N, K] int8 * scale[N, None]) ^T -> [M, N] float32."""
    return _extension().gemv_int8(x.contiguous(), w, scale)
