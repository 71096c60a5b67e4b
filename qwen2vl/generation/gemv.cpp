// Decode matmuls on CPU: out[M, N] = x[M, K] @ w[N, K]^T (* scale[N]) (+ bias[N]) for a few
// activation rows M, with bf16 or int8 weights and float32 accumulation.
//
// Decode is bound by reading the weights once per token. Each thread streams a contiguous block
// of weight rows, widens them in registers and multiplies them against all M rows at once, so
// memory traffic is the weights plus a small, cache-resident x. Built by gemv.py with
// -march=native; without AVX2+FMA or AVX-512 it reports simd_width() == 0 and is not used.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

static inline float to_f32(uint16_t h) {  // bf16 bits -> float
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float to_f32(int8_t q) { return float(q); }

#if defined(__AVX512F__)
constexpr int L = 16;
using vec = __m512;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec wload(const uint16_t* p) {
  __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
static inline vec wload(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
}
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int L = 8;
using vec = __m256;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
static inline vec wload(const uint16_t* p) {
  __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
static inline vec wload(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#else
constexpr int L = 0;  // no SIMD path: gemv.py does not use this build
#endif

// R weight rows (stride K) against MB activation rows (float32, stride K) -> out[m * R + r].
// Two accumulators per pair hide the FMA latency; with R > 1 each x vector loaded serves R rows.
template <int R, int MB, typename W>
static inline void tile(const W* w, const float* x, int64_t K, float* out) {
  int64_t k = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  vec acc[R][MB][2];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) acc[r][m][0] = acc[r][m][1] = vzero();
  for (; k + 2 * L <= K; k += 2 * L) {
    vec xv[MB][2];
    for (int m = 0; m < MB; m++) {
      xv[m][0] = vload(x + m * K + k);
      xv[m][1] = vload(x + m * K + k + L);
    }
    for (int r = 0; r < R; r++) {
      vec w0 = wload(w + r * K + k), w1 = wload(w + r * K + k + L);
      for (int m = 0; m < MB; m++) {
        acc[r][m][0] = vfma(w0, xv[m][0], acc[r][m][0]);
        acc[r][m][1] = vfma(w1, xv[m][1], acc[r][m][1]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) out[m * R + r] = vsum(vadd(acc[r][m][0], acc[r][m][1]));
#else
  for (int i = 0; i < R * MB; i++) out[i] = 0.f;
#endif
  for (; k < K; k++)
    for (int r = 0; r < R; r++)
      for (int m = 0; m < MB; m++) out[m * R + r] += to_f32(w[r * K + k]) * x[m * K + k];
}

// R weight rows against all M activation rows, four at a time -> s[m * R + r].
template <int R, typename W>
static inline void rows(const W* w, const float* x, int64_t M, int64_t K, float* s) {
  float t[4 * R];
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    const float* xm = x + m0 * K;
    const int64_t mb = std::min<int64_t>(4, M - m0);
    switch (mb) {
      case 4: tile<R, 4>(w, xm, K, t); break;
      case 3: tile<R, 3>(w, xm, K, t); break;
      case 2: tile<R, 2>(w, xm, K, t); break;
      default: tile<R, 1>(w, xm, K, t); break;
    }
    std::copy(t, t + mb * R, s + m0 * R);
  }
}

template <int R, typename W, typename O>
static void gemv_rows(const float* x, const W* w, const float* scale, const float* bias, O* out,
                      int64_t M, int64_t N, int64_t K) {
  const int64_t tiles = (N + R - 1) / R;
  at::parallel_for(0, tiles, std::max<int64_t>(1, 64 / R), [&](int64_t begin, int64_t end) {
    std::vector<float> s(M * R);
    for (int64_t t = begin; t < end; t++) {
      const int64_t n0 = t * R, nr = std::min<int64_t>(R, N - n0);
      if (nr == R) {
        rows<R>(w + n0 * K, x, M, K, s.data());
      } else {  // the last, partial tile: one row at a time, laid out as if R wide
        std::vector<float> one(M);
        for (int64_t r = 0; r < nr; r++) {
          rows<1>(w + (n0 + r) * K, x, M, K, one.data());
          for (int64_t m = 0; m < M; m++) s[m * R + r] = one[m];
        }
      }
      for (int64_t r = 0; r < nr; r++)
        for (int64_t m = 0; m < M; m++) {
          float v = s[m * R + r];
          if (scale) v *= scale[n0 + r];
          if (bias) v += bias[n0 + r];
          out[m * N + n0 + r] = O(v);
        }
    }
  });
}

template <typename W, typename O>
static void gemv_typed(const float* x, const W* w, const float* scale, const float* bias, O* out,
                       int64_t M, int64_t N, int64_t K) {
  // One row at a time keeps one sequential stream per thread (fastest, measured); when the
  // activations outgrow L1 (long K, several rows), four rows share each x load instead.
  if (M * K * 4 > 32 * 1024)
    gemv_rows<4>(x, w, scale, bias, out, M, N, K);
  else
    gemv_rows<1>(x, w, scale, bias, out, M, N, K);
}

// A small tensor (activations, scales, bias) as contiguous float32, without a dispatcher round
// trip per call: decode makes hundreds of these calls per token.
static std::vector<float> floats(const torch::Tensor& t) {
  auto c = t.contiguous();
  const int64_t n = c.numel();
  std::vector<float> out(n);
  switch (c.scalar_type()) {
    case torch::kFloat: std::copy_n(c.data_ptr<float>(), n, out.data()); break;
    case torch::kBFloat16: {
      const auto* p = c.data_ptr<at::BFloat16>();
      for (int64_t i = 0; i < n; i++) out[i] = float(p[i]);
      break;
    }
    case torch::kHalf: {
      const auto* p = c.data_ptr<at::Half>();
      for (int64_t i = 0; i < n; i++) out[i] = float(p[i]);
      break;
    }
    default: TORCH_CHECK(false, "gemv: float32, bf16 or fp16 tensors expected");
  }
  return out;
}

torch::Tensor gemv(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> scale,
                   c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "gemv: x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && w.is_contiguous(),
              "gemv: CPU tensors and a contiguous weight expected");
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  const std::vector<float> xf = floats(x);
  std::vector<float> sf, bf;
  if (scale) sf = floats(*scale);
  if (bias) bf = floats(*bias);
  TORCH_CHECK(!scale || int64_t(sf.size()) == N, "gemv: one scale per output row expected");
  TORCH_CHECK(!bias || int64_t(bf.size()) == N, "gemv: one bias per output row expected");
  const float* sp = scale ? sf.data() : nullptr;
  const float* bp = bias ? bf.data() : nullptr;
  auto out = torch::empty({M, N}, x.options());
  const float* xp = xf.data();
  auto run = [&](const auto* wp) {
    switch (out.scalar_type()) {
      case torch::kBFloat16:
        gemv_typed(xp, wp, sp, bp, out.data_ptr<at::BFloat16>(), M, N, K);
        break;
      case torch::kHalf: gemv_typed(xp, wp, sp, bp, out.data_ptr<at::Half>(), M, N, K); break;
      case torch::kFloat: gemv_typed(xp, wp, sp, bp, out.data_ptr<float>(), M, N, K); break;
      default: TORCH_CHECK(false, "gemv: activations must be bf16, fp16 or fp32");
    }
  };
  if (w.scalar_type() == torch::kBFloat16)
    run(reinterpret_cast<const uint16_t*>(w.data_ptr()));
  else if (w.scalar_type() == torch::kChar)
    run(w.data_ptr<int8_t>());
  else
    TORCH_CHECK(false, "gemv: weights must be bf16 or int8");
  return out;
}

int simd_width() { return L; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "x [M, K] @ w[N, K]^T (* scale) (+ bias), float32 accumulation");
  m.def("simd_width", &simd_width, "float32 lanes of the compiled path; 0: none");
}
