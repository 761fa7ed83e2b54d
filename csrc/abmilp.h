// Softmax-weighted pooling of tokens: AbMILP (Eq. 5, K linear score branches) and pooling with
// given logits (the paper's Eq. 5; beyond_cls/reference.py). Forward and backward per op; the autograd wiring
// lives on the Python side.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace beyond_cls {

// tokens [B, N, D] (float32, float64, bfloat16 or float16; any strides), weight [K, D], bias [K],
// mask [B, N] bool (True = keep). logits = tokens·weightᵀ + bias, softmax over N per branch.
// Returns (pooled [B, K, D] in tokens' dtype, scores [B, K, N] in the accumulation type: float32,
// or float64 for float64 tokens). A branch whose tokens are all masked gives NaN.
std::tuple<at::Tensor, at::Tensor> abmilp_forward_cpu(const at::Tensor& tokens, const at::Tensor& weight,
                                                      const at::Tensor& bias,
                                                      const std::optional<at::Tensor>& mask);

// Gradients of abmilp_forward given grad_pooled [B, K, D] and optionally grad_scores [B, K, N].
// Returns (grad_tokens [B, N, D] contiguous in tokens' dtype, or an empty [0] tensor when tokens_grad
// is false and then not computed; grad_weight [K, D] and grad_bias [K], both in weight's dtype: the
// backward does not see bias, the caller casts). `pooled` (the forward's, = Σ_n s·z_n) gives the
// softmax backward's c = Σ_n s·(g·z_n) up front as g·pooled, so dl and grad_weight come out of one
// sweep over the tokens; Σ_n s·(g·z_n) / Σ_n s is still summed on the way, in float64, and corrects
// the estimate, so the result is autograd's softmax backward with Σ_n dl_n = 0 to rounding (no error
// common to all tokens, which grad_weight would multiply by pooled). grad_pooled and pooled may have
// any strides (an expanded gradient is not copied first).
std::tuple<at::Tensor, at::Tensor, at::Tensor> abmilp_backward_cpu(
    const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_scores, const at::Tensor& tokens,
    const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& pooled, bool tokens_grad);

// tokens [B, N, D], logits [B, K, N] (any floating dtype), mask [B, N] bool. Same outputs as
// abmilp_forward_cpu.
std::tuple<at::Tensor, at::Tensor> softmax_pool_forward_cpu(const at::Tensor& tokens, const at::Tensor& logits,
                                                            const std::optional<at::Tensor>& mask);

// Returns (grad_tokens as above, grad_logits [B, K, N] in the accumulation type).
std::tuple<at::Tensor, at::Tensor> softmax_pool_backward_cpu(const at::Tensor& grad_pooled,
                                                             const std::optional<at::Tensor>& grad_scores,
                                                             const at::Tensor& tokens, const at::Tensor& scores,
                                                             const at::Tensor& pooled, bool tokens_grad);

}  // namespace beyond_cls
