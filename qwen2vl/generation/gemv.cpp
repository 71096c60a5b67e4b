// Decode matmuls on CPU: out[M, N] = x[M, K] @ w[N, K]^T (* scale[N]) (+ bias[N]) for a few
// activation rows M, with bf16, int8 or int4 weights.
//
// Decode is bound by reading the weights once per token. Each thread streams a contiguous block
// of weight rows and multiplies them against all M rows at once, so memory traffic is the
// weights plus a small, cache-resident x. bf16 weights are widened in registers and accumulated
// in float32; int8 and int4 weights are multiplied as integers by x quantised to int8 (below).
// Each tile prefetches the next tile's rows: the hardware prefetcher, which needs a few misses to
// catch on to a stream, loses most of a short row (1.5x for int4 at K = 1536, measured); and the
// tile after that into L2, which keeps more reads in flight (a 2B decode step 1.05x int4 and
// int8, 1.07-1.14x bf16 on a 2-core AVX-512 Xeon, measured). Built
// by gemv.py with -march=native; without AVX2+FMA or AVX-512 it reports simd_width() == 0 and is
// not used.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include "kernels.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

static inline float to_f32(uint16_t h) {  // bf16 bits -> float
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline float to_f32(int8_t q) { return float(q); }

#if defined(__AVX__)
static inline float hsum(__m256 a) {  // the sum of a's eight floats
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  return _mm_cvtss_f32(h);
}
#endif

// f(std::integral_constant<int, mb>) for mb in 1..4: a tile's activation rows, a template argument.
template <typename F>
static inline void by_rows(int64_t mb, F&& f) {
  switch (mb) {
    case 4: f(std::integral_constant<int, 4>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    default: f(std::integral_constant<int, 1>()); break;
  }
}

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
static inline float vsum(vec a) { return hsum(a); }
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
// With fewer than four (row, x row) pairs, two accumulators per pair hide the FMA latency.
template <int R, int MB, typename W>
static inline void tile(const W* w, const float* x, int64_t K, float* out) {
  int64_t k = 0;
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  constexpr int A = R * MB >= 4 ? 1 : 2;
  vec acc[R][MB][A];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++)
      for (int a = 0; a < A; a++) acc[r][m][a] = vzero();
  for (; k + 2 * L <= K; k += 2 * L) {
    for (int r = 0; r < R; r++) {
      _mm_prefetch((const char*)(w + (r + R) * K + k), _MM_HINT_T0);  // the next tile's rows
      _mm_prefetch((const char*)(w + (r + 2 * R) * K + k), _MM_HINT_T1);  // and the one after
      vec w0 = wload(w + r * K + k), w1 = wload(w + r * K + k + L);
      for (int m = 0; m < MB; m++) {
        acc[r][m][0] = vfma(w0, vload(x + m * K + k), acc[r][m][0]);
        acc[r][m][A - 1] = vfma(w1, vload(x + m * K + k + L), acc[r][m][A - 1]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++)
      out[m * R + r] = vsum(A == 2 ? vadd(acc[r][m][0], acc[r][m][A - 1]) : acc[r][m][0]);
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
    by_rows(mb, [&](auto MB) { tile<R, MB>(w, xm, K, t); });
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
  // Decode: one weight row at a time, one sequential stream per thread (fastest, measured).
  // Several activation rows: two weight rows a tile, each widened weight serving 2 x MB products
  // with every accumulator in a register (four rows spilled them on AVX2: 1.25x slower at 8 rows).
  if (M > 1)
    gemv_rows<2>(x, w, scale, bias, out, M, N, K);
  else
    gemv_rows<1>(x, w, scale, bias, out, M, N, K);
}

// ---- int8 activations ------------------------------------------------------------------------
// Integer weights (int8, int4) meet activations quantised to int8 per group of G along K (scale
// max|x| / 127) and are multiplied as integers (maddubs: u8 x s8 pairs summed in int16, then
// int32): widening every weight to float costs more than the bytes it saves on this path.

static inline float half_to_f32(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return float(c10::Half(h, c10::Half::from_bits()));
#endif
}

struct Int8Rows {  // activations [M, K] quantised per group: values, scales, scale * sum(values)
  std::vector<int8_t> q;
  std::vector<float> scale, zero;
};

static Int8Rows quantize_rows(const std::vector<float>& x, int64_t M, int64_t K, int64_t G) {
  const int64_t groups = K / G;
  Int8Rows r{std::vector<int8_t>(M * K), std::vector<float>(M * groups), std::vector<float>(M * groups)};
  for (int64_t i = 0; i < M * groups; i++) {
    const float* v = x.data() + i * G;
    float amax = 0.f;
    for (int64_t k = 0; k < G; k++) amax = std::max(amax, std::abs(v[k]));
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < G; k++) {
      const int8_t q = int8_t(std::nearbyint(v[k] * inv));
      r.q[i * G + k] = q;
      sum += q;
    }
    r.scale[i] = s;
    r.zero[i] = s * float(sum);
  }
  return r;
}

// ---- int8 weights ----------------------------------------------------------------------------
// Symmetric per output row (w = q * scale[n], |q| <= 127 as quantize.py writes them; -128 works
// too), activations in groups of 32. maddubs takes its first operand unsigned, so |w| meets x
// with w's sign; a pair's sum, at most 2 * 128 * 127, fits int16. Each group's sum is exact; the
// float32 result differs from the widened-weight path by the activations' rounding alone.
constexpr int64_t INT8_GROUP = 32;

#if defined(__AVX2__)
// R weight rows against MB activation rows (from xq, xs at the tile's first row) ->
// out[m * R + r], before the weight rows' scales.
template <int R, int MB>
static inline void int8_tile(const int8_t* w, const int8_t* xq, const float* xs, int64_t K,
                             float* out) {
  const int64_t groups = K / INT8_GROUP;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][MB];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m256i xv[MB];
    __m256 xsv[MB];
    for (int m = 0; m < MB; m++) {
      xv[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + g * INT8_GROUP));
      xsv[m] = _mm256_broadcast_ss(xs + m * groups + g);
    }
    for (int r = 0; r < R; r++) {
      _mm_prefetch((const char*)(w + (r + R) * K + g * INT8_GROUP), _MM_HINT_T0);  // next tile
      _mm_prefetch((const char*)(w + (r + 2 * R) * K + g * INT8_GROUP), _MM_HINT_T1);
      const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + r * K + g * INT8_GROUP));
      const __m256i aw = _mm256_abs_epi8(wv);
      for (int m = 0; m < MB; m++) {
        const __m256i d = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv[m], wv)), ones);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), xsv[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) out[m * R + r] = hsum(acc[r][m]);
}

template <typename O>
static void gemv_int8_typed(const Int8Rows& x, const int8_t* w, const float* scale,
                            const float* bias, O* out, int64_t M, int64_t N, int64_t K) {
  const int64_t groups = K / INT8_GROUP;
  auto put = [&](int64_t m, int64_t n, float v) {
    if (scale) v *= scale[n];
    out[m * N + n] = O(bias ? v + bias[n] : v);
  };
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    float t[4];
    if (M == 1)  // decode: four weight rows a tile, each activation load serving all four
      for (; begin + 4 <= end; begin += 4) {
        int8_tile<4, 1>(w + begin * K, x.q.data(), x.scale.data(), K, t);
        for (int r = 0; r < 4; r++) put(0, begin + r, t[r]);
      }
    for (int64_t n = begin; n < end; n++)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        const int8_t* xq = x.q.data() + m0 * K;
        const float* xs = x.scale.data() + m0 * groups;
        by_rows(mb, [&](auto MB) { int8_tile<1, MB>(w + n * K, xq, xs, K, t); });
        for (int64_t m = 0; m < mb; m++) put(m0 + m, n, t[m]);
      }
  });
}
#endif

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

// f(pointer to out's data) for the activations' dtypes: the output takes x's.
template <typename F>
static void by_out(torch::Tensor& out, F&& f) {
  switch (out.scalar_type()) {
    case torch::kBFloat16: f(out.data_ptr<at::BFloat16>()); break;
    case torch::kHalf: f(out.data_ptr<at::Half>()); break;
    case torch::kFloat: f(out.data_ptr<float>()); break;
    default: TORCH_CHECK(false, "gemv: activations must be bf16, fp16 or fp32");
  }
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
  if (w.scalar_type() == torch::kBFloat16) {
    const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
    by_out(out, [&](auto* o) { gemv_typed(xf.data(), wp, sp, bp, o, M, N, K); });
  } else if (w.scalar_type() == torch::kChar) {
    const int8_t* wp = w.data_ptr<int8_t>();
#if defined(__AVX2__)
    if (K % INT8_GROUP == 0) {
      const Int8Rows xq = quantize_rows(xf, M, K, INT8_GROUP);
      by_out(out, [&](auto* o) { gemv_int8_typed(xq, wp, sp, bp, o, M, N, K); });
      return out;
    }
#endif
    by_out(out, [&](auto* o) { gemv_typed(xf.data(), wp, sp, bp, o, M, N, K); });
  } else {
    TORCH_CHECK(false, "gemv: weights must be bf16 or int8");
  }
  return out;
}

// ---- int4 weights ----------------------------------------------------------------------------
// Groups of G (64 or 128) along K, each w = u * scale + min with u in 0..15; scales and mins
// float16 [N, K / G]. Packed two per byte in chunks of 64 weights: byte j of a chunk holds weight
// j (low nibble) and weight 32 + j (high nibble), so one 32-byte load, a mask and a shift give
// the chunk's 64 values in order. Activations in groups of G; u is unsigned, so maddubs takes it
// as it is. The mins need no per-weight work: min * xscale * sum(xq) once per group. The result
// is exact for those int8 activations and the stored weights, up to float32 sums.

// One weight row's scales times one activation row's: comb[g] = scale[g] * xscale[g]; returns
// the mins' part of the dot product, sum over g of min[g] * xscale[g] * sum(xq)[g]. Vectorised:
// scalar, this setup cost as much as the row's integer products at K = 1536.
static inline float row_scales(const uint16_t* sc, const uint16_t* mn, const float* xs,
                               const float* xz, int64_t groups, float* comb) {
  int64_t g = 0;
  float corr = 0.f;
#if defined(__F16C__) && defined(__FMA__)
  __m256 c = _mm256_setzero_ps();
  for (; g + 8 <= groups; g += 8) {
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sc + g)));
    const __m256 z = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(mn + g)));
    _mm256_storeu_ps(comb + g, _mm256_mul_ps(s, _mm256_loadu_ps(xs + g)));
    c = _mm256_fmadd_ps(z, _mm256_loadu_ps(xz + g), c);
  }
  corr = hsum(c);
#endif
  for (; g < groups; g++) {
    comb[g] = half_to_f32(sc[g]) * xs[g];
    corr += half_to_f32(mn[g]) * xz[g];
  }
  return corr;
}

#if defined(__AVX2__)
// R weight rows (row_bytes apart) against MB activation rows (xq at the tile's first row) ->
// out[m * R + r] = sum over groups g of comb[(r * MB + m) * groups + g] * (u . xq)[g]. Decode
// takes R = 4, MB = 1: each activation load serves four rows, whose independent sums hide each
// chain's latency; several activation rows take R = 1.
template <int R, int MB, int CH>
static inline void int4_tile(const uint8_t* p, int64_t row_bytes, const float* comb,
                             const int8_t* xq, int64_t K, float* out) {
  constexpr int64_t G = 64 * CH;
  const int64_t groups = K / G;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R][MB];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) acc[r][m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m256i sum[R][MB];  // |u0 x0 + u1 x1| <= 3810: 8 products fit int16
    for (int r = 0; r < R; r++)
      for (int m = 0; m < MB; m++) sum[r][m] = _mm256_setzero_si256();
    for (int c = 0; c < CH; c++) {
      __m256i x0[MB], x1[MB];
      for (int m = 0; m < MB; m++) {
        x0[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + g * G + c * 64));
        x1[m] = _mm256_loadu_si256((const __m256i*)(xq + m * K + g * G + c * 64 + 32));
      }
      for (int r = 0; r < R; r++) {
        // the next tile's rows: short rows end before the hardware prefetcher has caught on
        _mm_prefetch((const char*)(p + (r + R) * row_bytes + (g * CH + c) * 32), _MM_HINT_T0);
        _mm_prefetch((const char*)(p + (r + 2 * R) * row_bytes + (g * CH + c) * 32), _MM_HINT_T1);
        const __m256i b = _mm256_loadu_si256((const __m256i*)(p + r * row_bytes + (g * CH + c) * 32));
        const __m256i lo = _mm256_and_si256(b, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        for (int m = 0; m < MB; m++) {
          sum[r][m] = _mm256_add_epi16(sum[r][m], _mm256_maddubs_epi16(lo, x0[m]));
          sum[r][m] = _mm256_add_epi16(sum[r][m], _mm256_maddubs_epi16(hi, x1[m]));
        }
      }
    }
    for (int r = 0; r < R; r++)
      for (int m = 0; m < MB; m++) {
        const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[r][m], ones));
        const __m256 cv = _mm256_broadcast_ss(comb + (r * MB + m) * groups + g);
        acc[r][m] = _mm256_fmadd_ps(dot, cv, acc[r][m]);
      }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) out[m * R + r] = hsum(acc[r][m]);
}
#else
template <int R, int MB, int CH>
static inline void int4_tile(const uint8_t* p, int64_t row_bytes, const float* comb,
                             const int8_t* xq, int64_t K, float* out) {
  constexpr int64_t G = 64 * CH;
  const int64_t groups = K / G;
  for (int r = 0; r < R; r++)
    for (int m = 0; m < MB; m++) {
      float acc = 0.f;
      for (int64_t g = 0; g < groups; g++) {
        int32_t dot = 0;
        for (int64_t k = 0; k < G; k++) {
          const uint8_t byte = p[r * row_bytes + (g * G + (k / 64) * 64) / 2 + k % 32];
          const int u = (k % 64) < 32 ? byte & 15 : byte >> 4;
          dot += u * xq[m * K + g * G + k];
        }
        acc += comb[(r * MB + m) * groups + g] * float(dot);
      }
      out[m * R + r] = acc;
    }
}
#endif

template <int CH, typename O>
static void gemv_int4_typed(const Int8Rows& x, const uint8_t* p, const uint16_t* sc,
                            const uint16_t* mn, const float* bias, O* out, int64_t M, int64_t N,
                            int64_t K) {
  const int64_t groups = K / (64 * CH), row_bytes = K / 2;
  auto put = [&](int64_t m, int64_t n, float v) { out[m * N + n] = O(bias ? v + bias[n] : v); };
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> comb(4 * groups);
    float t[4], corr[4];
    if (M == 1)  // decode: four weight rows a tile; the rows left go the general way below
      for (; begin + 4 <= end; begin += 4) {
        for (int r = 0; r < 4; r++)
          corr[r] = row_scales(sc + (begin + r) * groups, mn + (begin + r) * groups,
                               x.scale.data(), x.zero.data(), groups, comb.data() + r * groups);
        int4_tile<4, 1, CH>(p + begin * row_bytes, row_bytes, comb.data(), x.q.data(), K, t);
        for (int r = 0; r < 4; r++) put(0, begin + r, t[r] + corr[r]);
      }
    for (int64_t n = begin; n < end; n++)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        for (int64_t m = 0; m < mb; m++)
          corr[m] = row_scales(sc + n * groups, mn + n * groups, x.scale.data() + (m0 + m) * groups,
                               x.zero.data() + (m0 + m) * groups, groups, comb.data() + m * groups);
        const uint8_t* pn = p + n * row_bytes;
        const int8_t* xq = x.q.data() + m0 * K;
        by_rows(mb, [&](auto MB) { int4_tile<1, MB, CH>(pn, row_bytes, comb.data(), xq, K, t); });
        for (int64_t m = 0; m < mb; m++) put(m0 + m, n, t[m] + corr[m]);
      }
  });
}

static const uint16_t* halves(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kHalf && t.is_contiguous() && t.numel() == n,
              "gemv_int4: ", what, " must be contiguous float16 [N, K / group]");
  return reinterpret_cast<const uint16_t*>(t.data_ptr());
}

torch::Tensor gemv_int4(torch::Tensor x, torch::Tensor packed, torch::Tensor scales,
                        torch::Tensor mins, c10::optional<torch::Tensor> bias,
                        int64_t group) {
  TORCH_CHECK(group == 64 || group == 128, "gemv_int4: group 64 or 128");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == torch::kByte && packed.is_contiguous(),
              "gemv_int4: packed weights must be contiguous uint8 [N, K / 2]");
  const int64_t M = x.size(0), N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu() && x.size(1) <= K && K % group == 0,
              "gemv_int4: x [M, K'] with K' <= K (the padded K), K a multiple of the group");
  std::vector<float> xf(M * K, 0.f);  // zero columns up to the padded K
  const std::vector<float> xin = floats(x);
  for (int64_t m = 0; m < M; m++)
    std::copy_n(xin.data() + m * x.size(1), x.size(1), xf.data() + m * K);
  const Int8Rows xq = quantize_rows(xf, M, K, group);
  const uint16_t* sp = halves(scales, N * (K / group), "scales");
  const uint16_t* mp = halves(mins, N * (K / group), "mins");
  std::vector<float> bf;
  if (bias) bf = floats(*bias);
  TORCH_CHECK(!bias || int64_t(bf.size()) == N, "gemv_int4: one bias per output row expected");
  const float* bp = bias ? bf.data() : nullptr;
  auto out = torch::empty({M, N}, x.options());
  const uint8_t* p = packed.data_ptr<uint8_t>();
  by_out(out, [&](auto* o) {
    if (group == 64)
      gemv_int4_typed<1>(xq, p, sp, mp, bp, o, M, N, K);
    else
      gemv_int4_typed<2>(xq, p, sp, mp, bp, o, M, N, K);
  });
  return out;
}

// The stored weights as float32 into out [N, K] (prefill multiplies by them): one pass,
// parallel over rows, instead of PyTorch's several passes over a tensor of this size.
void dequantize_int4(torch::Tensor packed, torch::Tensor scales, torch::Tensor mins,
                     int64_t group, torch::Tensor out) {
  const int64_t N = packed.size(0), K = packed.size(1) * 2, groups = K / group;
  TORCH_CHECK(packed.scalar_type() == torch::kByte && packed.is_contiguous() && K % group == 0 &&
                  group % 64 == 0,
              "dequantize_int4: contiguous uint8 [N, K / 2], K a multiple of a group of 64k");
  TORCH_CHECK(out.scalar_type() == torch::kFloat && out.is_contiguous() && out.size(0) == N &&
                  out.size(1) == K,
              "dequantize_int4: out must be contiguous float32 [N, K]");
  const uint16_t* sp = halves(scales, N * groups, "scales");
  const uint16_t* mp = halves(mins, N * groups, "mins");
  const uint8_t* p = packed.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++)
      for (int64_t g = 0; g < groups; g++) {
        const float s = half_to_f32(sp[n * groups + g]);
        const float z = half_to_f32(mp[n * groups + g]);
        for (int64_t c = 0; c < group / 64; c++) {
          const uint8_t* b = p + n * K / 2 + (g * group + c * 64) / 2;
          float* w = o + n * K + g * group + c * 64;
          for (int j = 0; j < 32; j++) {
            w[j] = float(b[j] & 15) * s + z;
            w[32 + j] = float(b[j] >> 4) * s + z;
          }
        }
      }
  });
}

// x [..., K] times the operands' weight: gemv_int4 for packed weights, else gemv.
torch::Tensor linear(const LinearOperands& op, const torch::Tensor& x) {
  const auto& [w, scales, mins, bias, group] = op;
  const auto rows = x.reshape({-1, x.size(-1)});
  torch::Tensor out;
  if (w.scalar_type() == torch::kByte) {
    TORCH_CHECK(scales && mins, "linear: int4 weights need their scales and mins");
    out = gemv_int4(rows, w, *scales, *mins, bias, group);
  } else {
    out = gemv(rows, w, scales, bias);
  }
  auto shape = x.sizes().vec();
  shape.back() = out.size(1);
  return out.view(shape);
}

int simd_width() { return L; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "x [M, K] @ w[N, K]^T (* scale) (+ bias), float32 accumulation");
  m.def("gemv_int4", &gemv_int4, "x [M, K] @ int4 groups [N, K]^T (+ bias), int8 activations");
  m.def("dequantize_int4", &dequantize_int4, "int4 groups -> float32 [N, K] into out");
  m.def("simd_width", &simd_width, "float32 lanes of the compiled path; 0: none");
  m.attr("INT8_GROUP") = INT8_GROUP;
  m.def("rms_norm", &rms_norm, "RMSNorm of x [..., E] as model/text.py computes it");
  m.def("rotary", &rotary, "rotary of x [B, T, N * D] by cos/sin [B, T, D] as model/rope.py");
  m.def("one_query_attention", &one_query_attention, "q [B, H, 1, D] against k/v [B, K, S, D]");
  m.def("attention_inputs", &attention_inputs, "a decode step's q, k, v [B, heads, 1, D]");
  m.def("attention_output_and_mlp", &attention_output_and_mlp, "the rest of the layer's step");
}
