// The small per-token operations of a CPU decode step, one call each: RMSNorm, rotary and
// attention of one query against the KV cache; and a whole decoder layer's step in two calls.
// In PyTorch each is several operators on a few thousand numbers, and a 2B decode step spent
// about a fifth of its time dispatching them (measured: 20-30 ms of 75-110 ms in int4). Same
// arithmetic as the reference modules (float32 statistics and scores; a half-precision result
// rounded where the reference rounds it), so outputs agree to float32 rounding; compiled into
// gemv.py's extension beside gemv.cpp.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

// Dot product with eight independent partial sums: the compiler turns them into one vector
// register without reassociating anything.
static inline float dot8(const float* a, const float* b, int64_t n) {
  float acc[8] = {};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; i++) s += a[i] * b[i];
  return s;
}

template <typename T>
static inline void to_floats(const T* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i++) out[i] = float(x[i]);
}

template <typename F>
static void by_dtype(const torch::Tensor& t, const char* who, F&& f) {
  switch (t.scalar_type()) {
    case torch::kBFloat16: f(at::BFloat16()); break;
    case torch::kHalf: f(at::Half()); break;
    case torch::kFloat: f(float()); break;
    default: TORCH_CHECK(false, who, ": bf16, fp16 or fp32 tensors expected");
  }
}

// RMSNorm (model/text.py): h = x * rsqrt(mean(x^2) + eps) in float32, rounded to x's dtype,
// times the weight (same dtype) and rounded again. x [..., E] contiguous.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  const int64_t E = x.size(-1);
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.numel() == E &&
                  weight.scalar_type() == x.scalar_type() && x.device().is_cpu(),
              "rms_norm: contiguous CPU x [..., E] and a weight [E] of x's dtype expected");
  auto out = torch::empty_like(x);
  const int64_t rows = x.numel() / E;
  by_dtype(x, "rms_norm", [&](auto zero) {
    using T = decltype(zero);
    const T* xp = x.data_ptr<T>();
    const T* wp = weight.data_ptr<T>();
    T* op = out.data_ptr<T>();
    std::vector<float> f(E);
    for (int64_t r = 0; r < rows; r++) {
      to_floats(xp + r * E, E, f.data());
      const float ms = dot8(f.data(), f.data(), E) / float(E);
      const float inv = 1.f / std::sqrt(ms + float(eps));
      for (int64_t i = 0; i < E; i++) op[r * E + i] = T(float(wp[i]) * float(T(f[i] * inv)));
    }
  });
  return out;
}

// Rotary (model/rope.py apply_rotary): x * cos + rotate_half(x) * sin, each product and the sum
// rounded to x's dtype as the reference's three operators round them. x [B, T, N * D]
// contiguous (a projection's output: N heads of D), cos/sin [B, T, D] of x's dtype.
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t D) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.size(2) % D == 0 && D % 2 == 0,
              "rotary: contiguous x [B, T, N * D] expected");
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 3 && cos.size(0) == x.size(0) &&
                  cos.size(1) == x.size(1) && cos.size(2) == D &&
                  cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rotary: cos/sin [B, T, D] of x's dtype expected");
  auto c = cos.contiguous(), s = sin.contiguous();
  auto out = torch::empty_like(x);
  const int64_t rows = x.size(0) * x.size(1), heads = x.size(2) / D, half = D / 2;
  by_dtype(x, "rotary", [&](auto zero) {
    using T = decltype(zero);
    const T* xp = x.data_ptr<T>();
    const T* cp = c.data_ptr<T>();
    const T* sp = s.data_ptr<T>();
    T* op = out.data_ptr<T>();
    for (int64_t r = 0; r < rows; r++)
      for (int64_t h = 0; h < heads; h++) {
        const T* xh = xp + (r * heads + h) * D;
        T* oh = op + (r * heads + h) * D;
        for (int64_t i = 0; i < D; i++) {
          const float rot = i < half ? -float(xh[i + half]) : float(xh[i - half]);
          const T a = T(float(xh[i]) * float(cp[r * D + i]));
          const T b = T(rot * float(sp[r * D + i]));
          oh[i] = T(float(a) + float(b));
        }
      }
  });
  return out;
}

// One query per row against all its keys (model/attention.py one_query_attention): scores in
// float32 (q * D^-0.5 . k), softmax, the weighted sum of v, rounded to q's dtype once.
// q [B, H, 1, D]; k/v [B, K, S, D] with unit stride along D (views into a KV cache);
// mask None or boolean with B * S elements (True: may attend). Each (row, kv head) is a task.
torch::Tensor one_query_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                  c10::optional<torch::Tensor> mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes() && q.size(2) == 1 &&
                  q.size(0) == k.size(0) && q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0,
              "one_query_attention: q [B, H, 1, D], k/v [B, K, S, D] with K dividing H expected");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1 && k.scalar_type() == q.scalar_type() &&
                  v.scalar_type() == q.scalar_type(),
              "one_query_attention: k/v of q's dtype with unit stride along D expected");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), K = k.size(1), S = k.size(2);
  TORCH_CHECK(S > 0, "one_query_attention: no keys");
  const int64_t G = H / K;  // query heads per kv head
  auto qc = q.contiguous();
  torch::Tensor m;
  if (mask) {
    m = mask->to(torch::kBool).contiguous();
    TORCH_CHECK(m.numel() == B * S, "one_query_attention: a mask of B * S elements expected");
  }
  const bool* mp = mask ? m.data_ptr<bool>() : nullptr;
  auto out = torch::empty({B, H, 1, D}, q.options());
  const float scale = float(std::pow(double(D), -0.5));
  by_dtype(q, "one_query_attention", [&](auto zero) {
    using T = decltype(zero);
    const T* qp = qc.data_ptr<T>();
    const T* kp = k.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    T* op = out.data_ptr<T>();
    at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> qf(G * D), row(D), p(G * S), acc(G * D);
      for (int64_t task = begin; task < end; task++) {
        const int64_t b = task / K, kh = task % K;
        for (int64_t i = 0; i < G * D; i++) qf[i] = float(qp[(b * H + kh * G) * D + i]) * scale;
        const T* kb = kp + b * k.stride(0) + kh * k.stride(1);
        const T* vb = vp + b * v.stride(0) + kh * v.stride(1);
        const float ninf = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < S; t++) {
          const bool keep = !mp || mp[b * S + t];
          if (keep) to_floats(kb + t * k.stride(2), D, row.data());
          for (int64_t g = 0; g < G; g++)
            p[g * S + t] = keep ? dot8(qf.data() + g * D, row.data(), D) : ninf;
        }
        for (int64_t g = 0; g < G; g++) {  // softmax; a row with no key left is NaN, as SDPA's
          float* pg = p.data() + g * S;
          const float mx = *std::max_element(pg, pg + S);
          float sum = 0.f;
          for (int64_t t = 0; t < S; t++) sum += (pg[t] = std::exp(pg[t] - mx));
          for (int64_t t = 0; t < S; t++) pg[t] /= sum;
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t t = 0; t < S; t++) {
          to_floats(vb + t * v.stride(2), D, row.data());
          for (int64_t g = 0; g < G; g++) {
            const float w = p[g * S + t];
            float* a = acc.data() + g * D;
            for (int64_t i = 0; i < D; i++) a[i] += w * row[i];
          }
        }
        for (int64_t i = 0; i < G * D; i++) op[(b * H + kh * G) * D + i] = T(acc[i]);
      }
    });
  });
  return out;
}

// ---- a decoder layer's decode step ---------------------------------------------------------
// DecoderLayer (model/text.py) for one token a row, in two calls around the KV cache write, which
// stays with the cache (its owner knows where a row's token goes). The same operations in the
// same order and dtypes as the layer's CPU modules take one by one (compute.py), so the output
// is the same bits; what goes is ~25 Python module calls a layer (4-8% of a 2B step, measured).
// x [B, 1, E] -> q [B, heads, 1, D], k and v [B, kv_heads, 1, D]: input norm, projections,
// rotary on q and k.
std::vector<torch::Tensor> attention_inputs(torch::Tensor x, torch::Tensor norm, double eps,
                                            const LinearOperands& q, const LinearOperands& k,
                                            const LinearOperands& v, torch::Tensor cos,
                                            torch::Tensor sin, int64_t heads, int64_t kv_heads,
                                            int64_t head_dim) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "attention_inputs: x [B, 1, E] expected");
  const int64_t B = x.size(0), D = head_dim;
  const auto h = rms_norm(x, norm, eps);
  return {rotary(linear(q, h), cos, sin, D).view({B, heads, 1, D}),
          rotary(linear(k, h), cos, sin, D).view({B, kv_heads, 1, D}),
          linear(v, h).view({B, kv_heads, 1, D})};
}

// The rest of the step, k/v [B, kv_heads, S, D] being the cache with this token written:
// x + o(attention), then + down(silu(gate(h)) * up(h)) of its post-attention norm h.
torch::Tensor attention_output_and_mlp(torch::Tensor x, torch::Tensor q, torch::Tensor k,
                                       torch::Tensor v, c10::optional<torch::Tensor> mask,
                                       const LinearOperands& o, torch::Tensor norm, double eps,
                                       const LinearOperands& gate, const LinearOperands& up,
                                       const LinearOperands& down) {
  const int64_t B = x.size(0);
  x = x + linear(o, one_query_attention(q, k, v, mask).view({B, 1, -1}));
  const auto h = rms_norm(x, norm, eps);
  return x + linear(down, at::silu(linear(gate, h)) * linear(up, h));
}
