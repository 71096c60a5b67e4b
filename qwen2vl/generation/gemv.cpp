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

// ---- int4 ------------------------------------------------------------------------------------
// Weights in groups of G (64 or 128) along K, each w = u * scale + min with u in 0..15; scales
// and mins float16 [N, K / G]. Packed two per byte in chunks of 64 weights: byte j of a chunk
// holds weight j (low nibble) and weight 32 + j (high nibble), so one 32-byte load, a mask and a
// shift give the chunk's 64 values in order.
// Activations are quantised to int8 per group of G (scale max|x| / 127) and multiplied as
// integers (maddubs: u8 x s8 pairs summed in int16, then int32), which is what makes 4 bits
// faster than 8 here: widening every weight to float costs more than the bytes it saves. The
// mins need no per-weight work: min * xscale * sum(xq) once per group. The result is exact for
// those int8 activations and the stored weights, up to float32 sums.

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

static inline void halves_to_floats(const uint16_t* h, int64_t n, float* out) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
#endif
  for (; i < n; i++) out[i] = half_to_f32(h[i]);
}

// One weight row against MB activation rows: out[m] = sum over groups g of
// scale[g] * xscale[m, g] * (u . xq)[g]  (comb[m * groups + g] holds the product of scales).
template <int MB, int CH>
static inline void int4_tile(const uint8_t* p, const float* comb, const Int8Rows& x, int64_t m0,
                             int64_t K, float* out) {
  constexpr int64_t G = 64 * CH;
  const int64_t groups = K / G;
#if defined(__AVX2__)
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MB];
  for (int m = 0; m < MB; m++) acc[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m256i sum[MB];
    for (int m = 0; m < MB; m++) sum[m] = _mm256_setzero_si256();
    for (int c = 0; c < CH; c++) {
      const __m256i b = _mm256_loadu_si256((const __m256i*)(p + (g * CH + c) * 32));
      const __m256i lo = _mm256_and_si256(b, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
      for (int m = 0; m < MB; m++) {  // |u0 x0 + u1 x1| <= 3810: 8 products fit int16
        const int8_t* xq = x.q.data() + (m0 + m) * K + g * G + c * 64;
        const __m256i x0 = _mm256_loadu_si256((const __m256i*)xq);
        const __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq + 32));
        sum[m] = _mm256_add_epi16(sum[m], _mm256_maddubs_epi16(lo, x0));
        sum[m] = _mm256_add_epi16(sum[m], _mm256_maddubs_epi16(hi, x1));
      }
    }
    for (int m = 0; m < MB; m++) {
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[m], ones));
      acc[m] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(comb + m * groups + g), acc[m]);
    }
  }
  for (int m = 0; m < MB; m++) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[m] = _mm_cvtss_f32(h);
  }
#else
  for (int m = 0; m < MB; m++) {
    float acc = 0.f;
    for (int64_t g = 0; g < groups; g++) {
      int32_t dot = 0;
      for (int64_t k = 0; k < G; k++) {
        const uint8_t byte = p[(g * G + (k / 64) * 64) / 2 + k % 32];
        const int u = (k % 64) < 32 ? byte & 15 : byte >> 4;
        dot += u * x.q[(m0 + m) * K + g * G + k];
      }
      acc += comb[m * groups + g] * float(dot);
    }
    out[m] = acc;
  }
#endif
}

#if defined(__AVX2__)
// Decode (one activation row): R weight rows at once, so each group's activation bytes are loaded
// once for all of them and R independent sums hide the latency of each row's chain.
template <int R, int CH>
static inline void int4_rows(const uint8_t* p, int64_t row_bytes, const float* comb,
                             const int8_t* xq, int64_t K, float* out) {
  constexpr int64_t G = 64 * CH;
  const int64_t groups = K / G;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; g++) {
    __m256i sum[R];
    for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
    for (int c = 0; c < CH; c++) {
      const __m256i x0 = _mm256_loadu_si256((const __m256i*)(xq + g * G + c * 64));
      const __m256i x1 = _mm256_loadu_si256((const __m256i*)(xq + g * G + c * 64 + 32));
      for (int r = 0; r < R; r++) {
        const __m256i b = _mm256_loadu_si256((const __m256i*)(p + r * row_bytes + (g * CH + c) * 32));
        const __m256i lo = _mm256_and_si256(b, low);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(lo, x0));
        sum[r] = _mm256_add_epi16(sum[r], _mm256_maddubs_epi16(hi, x1));
      }
    }
    for (int r = 0; r < R; r++) {
      const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sum[r], ones));
      acc[r] = _mm256_fmadd_ps(dot, _mm256_broadcast_ss(comb + r * groups + g), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    out[r] = _mm_cvtss_f32(h);
  }
}
#endif

template <int CH, typename O>
static void gemv_int4_typed(const Int8Rows& x, const uint8_t* p, const uint16_t* sc,
                            const uint16_t* mn, const float* bias, O* out, int64_t M, int64_t N,
                            int64_t K) {
  const int64_t groups = K / (64 * CH);
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> scale(groups), zero(groups), comb(4 * groups);
    float t[4];
#if defined(__AVX2__)
    if (M == 1) {  // decode: four weight rows a tile; the rows left go the general way below
      constexpr int R = 4;
      for (; begin + R <= end; begin += R) {
        float corr[R] = {};
        for (int r = 0; r < R; r++) {
          halves_to_floats(sc + (begin + r) * groups, groups, scale.data());
          halves_to_floats(mn + (begin + r) * groups, groups, zero.data());
          for (int64_t g = 0; g < groups; g++) {
            comb[r * groups + g] = scale[g] * x.scale[g];
            corr[r] += zero[g] * x.zero[g];
          }
        }
        int4_rows<R, CH>(p + begin * K / 2, K / 2, comb.data(), x.q.data(), K, t);
        for (int r = 0; r < R; r++) {
          const float v = t[r] + corr[r];
          out[begin + r] = O(bias ? v + bias[begin + r] : v);
        }
      }
    }
#endif
    for (int64_t n = begin; n < end; n++) {
      halves_to_floats(sc + n * groups, groups, scale.data());
      halves_to_floats(mn + n * groups, groups, zero.data());
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        float corr[4] = {};  // sum over groups of min * xscale * sum(xq)
        for (int64_t m = 0; m < mb; m++) {
          const float* xs = x.scale.data() + (m0 + m) * groups;
          const float* xz = x.zero.data() + (m0 + m) * groups;
          for (int64_t g = 0; g < groups; g++) {
            comb[m * groups + g] = scale[g] * xs[g];
            corr[m] += zero[g] * xz[g];
          }
        }
        const uint8_t* pn = p + n * K / 2;
        switch (mb) {
          case 4: int4_tile<4, CH>(pn, comb.data(), x, m0, K, t); break;
          case 3: int4_tile<3, CH>(pn, comb.data(), x, m0, K, t); break;
          case 2: int4_tile<2, CH>(pn, comb.data(), x, m0, K, t); break;
          default: int4_tile<1, CH>(pn, comb.data(), x, m0, K, t); break;
        }
        for (int64_t m = 0; m < mb; m++) {
          const float v = t[m] + corr[m];
          out[(m0 + m) * N + n] = O(bias ? v + bias[n] : v);
        }
      }
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
  auto run = [&](auto* o) {
    switch (group) {
      case 64: gemv_int4_typed<1>(xq, p, sp, mp, bp, o, M, N, K); break;
      default: gemv_int4_typed<2>(xq, p, sp, mp, bp, o, M, N, K); break;
    }
  };
  switch (out.scalar_type()) {
    case torch::kBFloat16: run(out.data_ptr<at::BFloat16>()); break;
    case torch::kHalf: run(out.data_ptr<at::Half>()); break;
    case torch::kFloat: run(out.data_ptr<float>()); break;
    default: TORCH_CHECK(false, "gemv_int4: activations must be bf16, fp16 or fp32");
  }
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

int simd_width() { return L; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "x [M, K] @ w[N, K]^T (* scale) (+ bias), float32 accumulation");
  m.def("gemv_int4", &gemv_int4, "x [M, K] @ int4 groups [N, K]^T (+ bias), int8 activations");
  m.def("dequantize_int4", &dequantize_int4, "int4 groups -> float32 [N, K] into out");
  m.def("simd_width", &simd_width, "float32 lanes of the compiled path; 0: none");
}
