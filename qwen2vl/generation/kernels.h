// What gemv.cpp and decode_ops.cpp call of each other (one extension, built by gemv.py).
#pragma once
#include <torch/extension.h>

#include <cstdint>
#include <tuple>
#include <vector>

// One linear layer's operands as the Python modules hand them over (gemv.py): a weight (bf16,
// int8 or int4-packed uint8), its scales and mins where it has them, a bias, the int4 group.
using LinearOperands =
    std::tuple<torch::Tensor, c10::optional<torch::Tensor>, c10::optional<torch::Tensor>,
               c10::optional<torch::Tensor>, int64_t>;

// gemv.cpp
torch::Tensor linear(const LinearOperands& op, const torch::Tensor& x);

// decode_ops.cpp
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps);
torch::Tensor rotary(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, int64_t D);
torch::Tensor one_query_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                  c10::optional<torch::Tensor> mask);
std::vector<torch::Tensor> attention_inputs(torch::Tensor x, torch::Tensor norm, double eps,
                                            const LinearOperands& q, const LinearOperands& k,
                                            const LinearOperands& v, torch::Tensor cos,
                                            torch::Tensor sin, int64_t heads, int64_t kv_heads,
                                            int64_t head_dim);
torch::Tensor attention_output_and_mlp(torch::Tensor x, torch::Tensor q, torch::Tensor k,
                                       torch::Tensor v, c10::optional<torch::Tensor> mask,
                                       const LinearOperands& o, torch::Tensor norm, double eps,
                                       const LinearOperands& gate, const LinearOperands& up,
                                       const LinearOperands& down);
