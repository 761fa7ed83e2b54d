// CPU kernels of beyond_cls::abmilp_{forward,backward} and beyond_cls::softmax_pool_{forward,backward}.
//
// Work is split over the batch with at::parallel_for. Each task does all the work of one batch row
// while its tokens z_b [N, D] are hot in cache (600 KiB at ViT-B sizes: one L2): forward is the
// [K, N] logit GEMM, a softmax pass over that tile and the pooled GEMM; backward is the g·z_bᵀ GEMM,
// the softmax backward pass, the per-row grad_weight GEMM and, only when asked for, one grad_tokens
// GEMM. So z is read from memory once per op, where eager autograd reads it twice per op. The
// per-row grad_weight / grad_bias partials are summed over the batch in order at the end, so the
// result does not depend on the thread count. Low-precision tokens are converted one batch row at a
// time into a per-thread buffer; strided tokens (e.g. tokens[:, 1:]) go to the GEMMs as views.
#include "abmilp.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"
#include "row_math.h"

namespace beyond_cls {
namespace {

// Row passes over one branch's [N] tile, vectorized by the compiler (see row_math.h).

// l[j] <- l[j] + bias for kept tokens and -inf for masked ones (keep may be null: keep all), then
// l <- softmax(l). A row with no finite maximum (all masked, a +inf logit) or with a NaN gives NaN,
// as torch.softmax does.
template <typename T>
void softmax_row(T* l, int64_t n, T bias, const bool* keep) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  T m = -kInf;
  int nan = 0;
  if (keep == nullptr) {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < n; ++j) {
      const T x = l[j] + bias;
      l[j] = x;
      nan |= static_cast<int>(x != x);
      m = x > m ? x : m;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(| : nan)
    for (int64_t j = 0; j < n; ++j) {
      const T x = keep[j] ? l[j] + bias : -kInf;
      l[j] = x;
      nan |= static_cast<int>(x != x);
      m = x > m ? x : m;
    }
  }
  if (nan != 0 || !std::isfinite(m)) {
    std::fill(l, l + n, std::numeric_limits<T>::quiet_NaN());
    return;
  }
  T z = 0;
#pragma omp simd reduction(+ : z)
  for (int64_t j = 0; j < n; ++j) {
    const T e = exp_nonpositive(l[j] - m);  // masked: e^-inf = 0
    l[j] = e;
    z += e;
  }
  const T inv = T(1) / z;  // z >= 1: the maximum contributes e^0
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) l[j] *= inv;
}

// Softmax backward of one branch: t = gz (+ gs); dl = s·(t − Σ s·t), written over gz. Returns Σ dl.
template <typename T>
T softmax_backward_row(T* gz, const T* s, const T* gs, int64_t n) {
  T c = 0;
  if (gs != nullptr) {
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < n; ++j) {
      const T t = gz[j] + gs[j];
      gz[j] = t;
      c += s[j] * t;
    }
  } else {
#pragma omp simd reduction(+ : c)
    for (int64_t j = 0; j < n; ++j) c += s[j] * gz[j];
  }
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t j = 0; j < n; ++j) {
    const T d = s[j] * (gz[j] - c);
    gz[j] = d;
    total += d;
  }
  return total;
}

// out[i] = Σ_b partial[b, i] for a contiguous [B, ...] tensor of M elements per row, summed in batch
// order.
template <typename T>
at::Tensor sum_over_batch(const at::Tensor& partial, int64_t m) {
  const int64_t batch = partial.size(0);
  at::Tensor out = at::zeros({m}, partial.options());
  const T* src = partial.const_data_ptr<T>();
  T* dst = out.data_ptr<T>();
  at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = 0; b < batch; ++b) {
      const T* row = src + b * m;
#pragma omp simd
      for (int64_t i = begin; i < end; ++i) dst[i] += row[i];
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Argument checks: every message names the op and the argument.

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, " (C++): ", name, " must be a CPU tensor, got ", t.device());
}

void check_floating(const char* op, const char* name, const at::Tensor& t) {
  check_cpu(op, name, t);
  TORCH_CHECK(t.is_floating_point(), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want,
                 const char* layout) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must be ", layout, " = ", want, ", got ", t.sizes());
}

void check_tokens(const char* op, const at::Tensor& tokens) {
  check_cpu(op, "tokens", tokens);
  TORCH_CHECK(tokens.dim() == 3, op, ": tokens must be [B, N, D], got ", tokens.sizes());
  const auto dt = tokens.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              " (C++): tokens must be float32/float64/bfloat16/float16, got ", dt);
  TORCH_CHECK(tokens.size(1) > 0 && tokens.size(2) > 0, op, ": tokens has no tokens or no features, got ",
              tokens.sizes());
}

void check_mask(const char* op, const std::optional<at::Tensor>& mask, const at::Tensor& tokens) {
  if (!mask.has_value()) return;
  check_cpu(op, "mask", *mask);
  TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool (True = keep), got ",
              mask->scalar_type());
  check_shape(op, "mask", *mask, {tokens.size(0), tokens.size(1)}, "[B, N]");
}

// weight [K, D] with D = tokens' D; returns K.
int64_t check_weight(const char* op, const at::Tensor& weight, const at::Tensor& tokens) {
  check_floating(op, "weight", weight);
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [K, D], got ", weight.sizes());
  TORCH_CHECK(weight.size(0) > 0, op, ": weight must have at least one branch (K >= 1), got ", weight.sizes());
  TORCH_CHECK(weight.size(1) == tokens.size(2), op, ": weight [K, D] must match tokens' D = ", tokens.size(2),
              ", got weight ", weight.sizes());
  return weight.size(0);
}

// Backward inputs shared by both ops: grad_pooled, pooled [B, K, D]; grad_scores, scores [B, K, N].
void check_backward(const char* op, const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_scores,
                    const at::Tensor& tokens, const at::Tensor& scores, const at::Tensor& pooled, int64_t k) {
  const int64_t batch = tokens.size(0), n = tokens.size(1), d = tokens.size(2);
  check_floating(op, "grad_pooled", grad_pooled);
  check_shape(op, "grad_pooled", grad_pooled, {batch, k, d}, "[B, K, D]");
  if (grad_scores.has_value()) {
    check_floating(op, "grad_scores", *grad_scores);
    check_shape(op, "grad_scores", *grad_scores, {batch, k, n}, "[B, K, N]");
  }
  check_floating(op, "scores", scores);
  check_shape(op, "scores", scores, {batch, k, n}, "[B, K, N]");
  check_floating(op, "pooled", pooled);
  check_shape(op, "pooled", pooled, {batch, k, d}, "[B, K, D]");
}

at::ScalarType acc_type(const at::Tensor& tokens) {
  return tokens.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// ---------------------------------------------------------------------------------------------
// Single-pass AbMILP rows: every token row is read once, while it is in L1, for all K branches.

template <typename T>
T dot(const T* a, const T* b, int64_t d) {
  T acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

template <typename T>
void axpy(T* y, T a, const T* x, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) y[i] += a * x[i];
}

// Forward of one batch row: raw = z·Wᵀ (into `raw` [K, N], bias not added) and pooled [K, D] by an
// online softmax (running max per branch, the accumulator rescaled when it moves).
template <typename T>
void abmilp_forward_row(const T* z, int64_t zs, int64_t n, int64_t d, const T* w, const T* bias, int64_t k,
                        const bool* keep, T* raw, T* pooled) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  std::vector<T> m(k, -kInf), total(k, T(0));
  std::fill(pooled, pooled + k * d, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* row = z + j * zs;
    for (int64_t i = 0; i < k; ++i) {
      const T r = dot(row, w + i * d, d);
      raw[i * n + j] = r;
      if (keep != nullptr && !keep[j]) continue;
      const T l = r + (bias ? bias[i] : T(0));
      T* acc = pooled + i * d;
      if (l > m[i]) {  // new maximum: rescale what was accumulated against the old one
        const T scale = m[i] == -kInf ? T(0) : std::exp(m[i] - l);
        if (total[i] != T(0)) {
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) acc[c] *= scale;
        }
        total[i] *= scale;
        m[i] = l;
      }
      const T e = std::exp(l - m[i]);
      total[i] += e;
      axpy(acc, e, row, d);
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    const T inv = total[i] > T(0) && std::isfinite(total[i]) ? T(1) / total[i] : std::numeric_limits<T>::quiet_NaN();
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) pooled[i * d + c] *= inv;
  }
}

// Backward of one batch row: t = g·z (+ gs) per token (first sweep, K dots per row), then
// dl = s·(t − Σ s·t) accumulated into the grad_weight / grad_bias partials (second sweep, K axpys
// per row; the rows are still in cache). Σ s·t, as autograd computes it, keeps dl exact when t and
// its mean nearly cancel.
template <typename T>
void abmilp_backward_row(const T* z, int64_t zs, int64_t n, int64_t d, const T* g, const T* s, const T* gs,
                         int64_t k, T* dl, T* w_partial, T* b_partial) {
  for (int64_t j = 0; j < n; ++j) {
    const T* row = z + j * zs;
    for (int64_t i = 0; i < k; ++i) dl[i * n + j] = dot(g + i * d, row, d);
  }
  for (int64_t i = 0; i < k; ++i) b_partial[i] = softmax_backward_row<T>(dl + i * n, s + i * n, gs ? gs + i * n : nullptr, n);
  std::fill(w_partial, w_partial + k * d, T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T* row = z + j * zs;
    for (int64_t i = 0; i < k; ++i) {
      const T dlj = dl[i * n + j];
      if (dlj != T(0)) axpy(w_partial + i * d, dlj, row, d);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels. `weight` is undefined for softmax_pool, `logits` for AbMILP.

// One batch row of tokens as an acc_t [N, D] matrix: a view when tokens are acc_t already, else a
// per-thread converted copy.
struct TokenRows {
  const at::Tensor& tokens;
  at::Tensor buffer;
  TokenRows(const at::Tensor& t, at::ScalarType acc) : tokens(t) {
    if (t.scalar_type() != acc) buffer = at::empty({t.size(1), t.size(2)}, t.options().dtype(acc));
  }
  at::Tensor operator[](int64_t b) {
    if (!buffer.defined()) return tokens[b];
    buffer.copy_(tokens[b]);
    return buffer;
  }
};

template <typename acc_t>
void pool_forward(const at::Tensor& tokens, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& logits, const at::Tensor& keep, at::Tensor& scores, at::Tensor& pooled) {
  const int64_t batch = tokens.size(0), n = tokens.size(1), d = tokens.size(2), k = scores.size(1);
  const auto acc = scores.scalar_type();
  const bool* keep_ptr = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  const acc_t* bias_ptr = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  acc_t* scores_ptr = scores.data_ptr<acc_t>();

  parallel_tasks(0, batch, 1, [&](int64_t begin, int64_t end) {
    TokenRows rows(tokens, acc);
    at::Tensor pooled_acc;  // acc_t staging for low-precision pooled
    if (pooled.scalar_type() != acc) pooled_acc = at::empty({k, d}, scores.options());
    for (int64_t b = begin; b < end; ++b) {
      const at::Tensor z = rows[b];
      at::Tensor s = scores[b];
      acc_t* sp = scores_ptr + b * k * n;
      const bool* keep_b = keep_ptr ? keep_ptr + b * n : nullptr;
      if (weight.defined()) {  // one pass over the token rows: logits and pooled together
        const at::Tensor zc = z.stride(1) == 1 ? z : z.contiguous();
        abmilp_forward_row<acc_t>(zc.const_data_ptr<acc_t>(), zc.stride(0), n, d, weight.const_data_ptr<acc_t>(),
                                  bias_ptr, k, keep_b, sp, pooled[b].data_ptr<acc_t>());
        for (int64_t i = 0; i < k; ++i) softmax_row<acc_t>(sp + i * n, n, bias_ptr ? bias_ptr[i] : acc_t(0), keep_b);
        continue;
      }
      s.copy_(logits[b]);
      for (int64_t i = 0; i < k; ++i) softmax_row<acc_t>(sp + i * n, n, acc_t(0), keep_b);
      if (pooled_acc.defined()) {
        at::mm_out(pooled_acc, s, z);
        pooled[b].copy_(pooled_acc);
      } else {
        at::Tensor p = pooled[b];
        at::mm_out(p, s, z);
      }
    }
  });
}

// grad_logits: [B, K, N] acc_t output (softmax_pool) or undefined (AbMILP: dl stays per-thread).
// weight_partial [B, K, D] and bias_partial [B, K]: per-row grad_weight / grad_bias (AbMILP).
template <typename acc_t>
void pool_backward(const at::Tensor& grad_pooled, const at::Tensor& grad_scores, const at::Tensor& tokens,
                   const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& pooled, at::Tensor& grad_tokens,
                   at::Tensor& grad_logits, at::Tensor& weight_partial, at::Tensor& bias_partial) {
  const int64_t batch = tokens.size(0), n = tokens.size(1), d = tokens.size(2), k = scores.size(1);
  const auto acc = scores.scalar_type();
  const bool abmilp = weight.defined(), tokens_grad = grad_tokens.numel() > 0;
  const acc_t* scores_ptr = scores.const_data_ptr<acc_t>();
  const acc_t* gs_ptr = grad_scores.defined() ? grad_scores.const_data_ptr<acc_t>() : nullptr;
  acc_t* bias_partial_ptr = abmilp ? bias_partial.data_ptr<acc_t>() : nullptr;

  parallel_tasks(0, batch, 1, [&](int64_t begin, int64_t end) {
    TokenRows rows(tokens, acc);
    // AbMILP: `stack` = [s; dl] [2K, N] and `right` = [g_b; W] [2K, D], so that
    // grad_tokens_b = sᵀ·g_b + dlᵀ·W is one GEMM with inner size 2K.
    at::Tensor stack, right, dl_tile;
    if (abmilp) {
      stack = at::empty({2 * k, n}, scores.options());
      dl_tile = stack.narrow(0, k, k);
      if (tokens_grad) {
        right = at::empty({2 * k, d}, scores.options());
        right.narrow(0, k, k).copy_(weight);
      }
    }
    at::Tensor tokens_acc;  // acc_t staging for low-precision grad_tokens
    if (tokens_grad && grad_tokens.scalar_type() != acc) tokens_acc = at::empty({n, d}, scores.options());

    for (int64_t b = begin; b < end; ++b) {
      const at::Tensor z = rows[b];
      const at::Tensor g = grad_pooled[b], s = scores[b];
      at::Tensor dl = abmilp ? dl_tile : grad_logits[b];
      if (abmilp) {  // one pass over the token rows for dl, grad_weight and grad_bias
        const at::Tensor zc = z.stride(1) == 1 ? z : z.contiguous();
        abmilp_backward_row<acc_t>(zc.const_data_ptr<acc_t>(), zc.stride(0), n, d,
                                   grad_pooled.const_data_ptr<acc_t>() + b * k * d, scores_ptr + b * k * n,
                                   gs_ptr ? gs_ptr + b * k * n : nullptr, k, dl.data_ptr<acc_t>(),
                                   weight_partial[b].data_ptr<acc_t>(), bias_partial_ptr + b * k);
      } else {
        at::mm_out(dl, g, z.t());  // gz = g_b·z_bᵀ [K, N]
        acc_t* dlp = dl.data_ptr<acc_t>();
        for (int64_t i = 0; i < k; ++i) {
          const int64_t row = (b * k + i) * n;
          softmax_backward_row<acc_t>(dlp + i * n, scores_ptr + row, gs_ptr ? gs_ptr + row : nullptr, n);
        }
      }
      if (!tokens_grad) continue;
      at::Tensor out = tokens_acc.defined() ? tokens_acc : grad_tokens[b];
      if (abmilp) {
        stack.narrow(0, 0, k).copy_(s);
        right.narrow(0, 0, k).copy_(g);
        at::mm_out(out, stack.t(), right);
      } else {
        at::mm_out(out, s.t(), g);
      }
      if (tokens_acc.defined()) grad_tokens[b].copy_(tokens_acc);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& tokens, const at::Tensor& weight,
                                           const at::Tensor& bias, const at::Tensor& logits,
                                           const std::optional<at::Tensor>& mask, int64_t k) {
  const at::NoGradGuard no_grad;  // the GEMMs write into out= views
  const auto acc = acc_type(tokens);
  const int64_t batch = tokens.size(0), n = tokens.size(1), d = tokens.size(2);
  at::Tensor scores = at::empty({batch, k, n}, tokens.options().dtype(acc));
  at::Tensor pooled = at::empty({batch, k, d}, tokens.options().dtype(acc));  // float32-accurate output
  const at::Tensor keep = mask.has_value() ? mask->contiguous() : at::Tensor();
  const at::Tensor w = weight.defined() ? weight.to(acc).contiguous() : at::Tensor();
  const at::Tensor bi = bias.defined() ? bias.to(acc).contiguous() : at::Tensor();
  if (acc == at::kDouble) {
    pool_forward<double>(tokens, w, bi, logits, keep, scores, pooled);
  } else {
    pool_forward<float>(tokens, w, bi, logits, keep, scores, pooled);
  }
  return {pooled, scores};
}

// Returns (grad_tokens, grad_logits or grad_weight [K, D] acc, grad_bias [K] acc or undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_pooled,
                                                        const std::optional<at::Tensor>& grad_scores,
                                                        const at::Tensor& tokens, const at::Tensor& weight,
                                                        const at::Tensor& scores, const at::Tensor& pooled,
                                                        bool tokens_grad) {
  const at::NoGradGuard no_grad;
  const auto acc = acc_type(tokens);
  const int64_t batch = tokens.size(0), n = tokens.size(1), d = tokens.size(2), k = scores.size(1);
  const auto acc_options = tokens.options().dtype(acc);
  const at::Tensor g = grad_pooled.to(acc).contiguous();
  const at::Tensor s = scores.to(acc).contiguous();
  const at::Tensor gs = grad_scores.has_value() ? grad_scores->to(acc).contiguous() : at::Tensor();
  const at::Tensor w = weight.defined() ? weight.to(acc).contiguous() : at::Tensor();
  const at::Tensor p = pooled.to(acc).contiguous();
  at::Tensor grad_tokens = at::empty({tokens_grad ? batch : 0, n, d}, tokens.options());
  at::Tensor grad_logits, weight_partial, bias_partial;
  if (weight.defined()) {
    weight_partial = at::empty({batch, k, d}, acc_options);
    bias_partial = at::empty({batch, k}, acc_options);
  } else {
    grad_logits = at::empty({batch, k, n}, acc_options);
  }
  if (acc == at::kDouble) {
    pool_backward<double>(g, gs, tokens, w, s, p, grad_tokens, grad_logits, weight_partial, bias_partial);
  } else {
    pool_backward<float>(g, gs, tokens, w, s, p, grad_tokens, grad_logits, weight_partial, bias_partial);
  }
  if (!weight.defined()) return {grad_tokens, grad_logits, at::Tensor()};
  at::Tensor grad_weight, grad_bias;
  if (acc == at::kDouble) {
    grad_weight = sum_over_batch<double>(weight_partial, k * d);
    grad_bias = sum_over_batch<double>(bias_partial, k);
  } else {
    grad_weight = sum_over_batch<float>(weight_partial, k * d);
    grad_bias = sum_over_batch<float>(bias_partial, k);
  }
  return {grad_tokens, grad_weight.view({k, d}), grad_bias};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> abmilp_forward_cpu(const at::Tensor& tokens, const at::Tensor& weight,
                                                      const at::Tensor& bias,
                                                      const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "abmilp_forward";
  check_tokens(op, tokens);
  const int64_t k = check_weight(op, weight, tokens);
  check_floating(op, "bias", bias);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == k, op, ": bias must be [K] with K = ", k,
              " (weight's rows), got bias ", bias.sizes());
  check_mask(op, mask, tokens);
  return forward(tokens, weight, bias, at::Tensor(), mask, k);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> abmilp_backward_cpu(
    const at::Tensor& grad_pooled, const std::optional<at::Tensor>& grad_scores, const at::Tensor& tokens,
    const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& pooled, bool tokens_grad) {
  constexpr const char* op = "abmilp_backward";
  check_tokens(op, tokens);
  const int64_t k = check_weight(op, weight, tokens);
  check_backward(op, grad_pooled, grad_scores, tokens, scores, pooled, k);
  auto [grad_tokens, grad_weight, grad_bias] = backward(grad_pooled, grad_scores, tokens, weight, scores, pooled, tokens_grad);
  const auto dt = weight.scalar_type();
  return {grad_tokens, grad_weight.to(dt), grad_bias.to(dt)};
}

std::tuple<at::Tensor, at::Tensor> softmax_pool_forward_cpu(const at::Tensor& tokens, const at::Tensor& logits,
                                                            const std::optional<at::Tensor>& mask) {
  constexpr const char* op = "softmax_pool_forward";
  check_tokens(op, tokens);
  check_floating(op, "logits", logits);
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [B, K, N], got ", logits.sizes());
  TORCH_CHECK(logits.size(0) == tokens.size(0) && logits.size(2) == tokens.size(1) && logits.size(1) > 0, op,
              ": logits must be [B, K, N] with K >= 1 and B, N = ", tokens.size(0), ", ", tokens.size(1),
              " from tokens ", tokens.sizes(), ", got logits ", logits.sizes());
  check_mask(op, mask, tokens);
  return forward(tokens, at::Tensor(), at::Tensor(), logits, mask, logits.size(1));
}

std::tuple<at::Tensor, at::Tensor> softmax_pool_backward_cpu(const at::Tensor& grad_pooled,
                                                             const std::optional<at::Tensor>& grad_scores,
                                                             const at::Tensor& tokens, const at::Tensor& scores,
                                                             const at::Tensor& pooled, bool tokens_grad) {
  constexpr const char* op = "softmax_pool_backward";
  check_tokens(op, tokens);
  check_floating(op, "scores", scores);
  TORCH_CHECK(scores.dim() == 3 && scores.size(1) > 0, op, ": scores must be [B, K, N] with K >= 1, got ",
              scores.sizes());
  check_backward(op, grad_pooled, grad_scores, tokens, scores, pooled, scores.size(1));
  auto [grad_tokens, grad_logits, unused] = backward(grad_pooled, grad_scores, tokens, at::Tensor(), scores, pooled, tokens_grad);
  return {grad_tokens, grad_logits};
}

TORCH_LIBRARY_IMPL(beyond_cls, CPU, m) {
  m.impl("abmilp_forward", &abmilp_forward_cpu);
  m.impl("abmilp_backward", &abmilp_backward_cpu);
  m.impl("softmax_pool_forward", &softmax_pool_forward_cpu);
  m.impl("softmax_pool_backward", &softmax_pool_backward_cpu);
}

}  // namespace beyond_cls
