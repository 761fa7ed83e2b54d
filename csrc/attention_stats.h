// Fused softmax attention with per-row statistics (see DESIGN.md, "Definitions").
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace beyond_cls {

// Most query rows keep_rows may name (the Triton kernel's limit, shared by every backend).
constexpr int64_t kMaxKeptRows = 8;

// q, k, v: [B, H, N, d] on the CPU (float32, float64, bfloat16 or float16).
// Returns (out [B, H, N, d] in v's dtype, self_attn, cls_attn, patch_mass, patch_entropy, kept_rows),
// the statistics [B, H, N] in float32; out is stored [B, N, H, d], as SDPA's (merging heads is a view).
// cls_attn holds a_i0 (meaningful when num_prefix_tokens > 0).
// kept_rows [B, H, R, N] float32 holds the full softmax rows of the R distinct queries in keep_rows
// (negative indices count from the end), in that order; [B, H, 0, N] when keep_rows is absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_with_stats_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t num_prefix_tokens,
    std::optional<double> scale, const std::optional<at::Tensor>& bias,
    at::OptionalIntArrayRef keep_rows);

}  // namespace beyond_cls
