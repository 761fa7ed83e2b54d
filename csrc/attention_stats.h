// Fused softmax attention with per-row statistics (defined in beyond_cls/statistics.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace beyond_cls {

// Most query rows keep_rows may name (the Triton kernel's limit, shared by every backend).
constexpr int64_t kMaxKeptRows = 8;

// The row statistics, in the order of ROW_STATISTICS in beyond_cls/statistics.py (a test checks it):
// planes of the stacked [S, B, H, N] output.
constexpr int64_t kSelfAttnRow = 0;      // a_ii
constexpr int64_t kClsAttnRow = 1;       // a_i0 (meaningful when num_prefix_tokens > 0)
constexpr int64_t kPatchMassRow = 2;     // m_i = sum over patches j of a_ij
constexpr int64_t kPatchEntropyRow = 3;  // H_i, entropy of the attention renormalized over the patches (nats)
constexpr int64_t kNumRowStatistics = 4;

// q, k, v: [B, H, N, d] on the CPU (float32, float64, bfloat16 or float16).
// Returns (out [B, H, N, d] in v's dtype, stats [S, B, H, N] float32 (rows as above), kept_rows);
// out is stored [B, N, H, d], as SDPA's (merging heads is a view).
// kept_rows [B, H, R, N] float32 holds the full softmax rows of the R distinct queries in keep_rows
// (negative indices count from the end), in that order; [B, H, 0, N] when keep_rows is absent.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_stats_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t num_prefix_tokens,
    std::optional<double> scale, const std::optional<at::Tensor>& bias,
    at::OptionalIntArrayRef keep_rows);

}  // namespace beyond_cls
