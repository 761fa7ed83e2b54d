// CPU kernels of beyond_cls::abmilp_{forward,backward} and beyond_cls::softmax_pool_{forward,backward}.
//
// Batch rows are handed to the threads one at a time (parallel_rows). AbMILP reads every token
// row from memory once per op, in blocks of 8 rows that stay in L1 between their two uses: the
// forward computes the block's logits and adds its softmax-weighted rows to pooled (lazy online
// softmax); the backward computes g·z, dl and adds the rows to the grad_weight partial. Eager
// autograd reads the tokens twice per op. Only grad_tokens (when asked for) and softmax_pool use
// per-row GEMMs. The per-row grad_weight / grad_bias partials are summed over the batch in order
// at the end, so the result does not depend on the thread count. Low-precision or feature-strided
// tokens are converted one batch row at a time into a per-thread buffer; row-strided tokens (e.g.
// tokens[:, 1:]) are read in place.
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
// Single-sweep AbMILP rows: every token row is read from memory once per op, for all K branches.
//
// Tokens go in blocks of kBlock rows (24 KiB at D = 768: the block stays in L1 between its two
// uses). Per branch, a register-blocked dot gives the block's kBlock logits (kBlock independent
// accumulators: the weight row is loaded once per block and the FMA latency is hidden), then one
// blocked axpy adds the block's kBlock weighted rows to the accumulator (one load and store of the
// accumulator per block instead of per token).

constexpr int kBlock = 8;

// The float row kernels are compiled once per x86 ISA level (row_math.h); their template bodies
// must be inlined into the clones to get the wider vectors.
#if defined(__GNUC__) || defined(__clang__)
#define BEYOND_CLS_INLINE inline __attribute__((always_inline))
#else
#define BEYOND_CLS_INLINE inline
#endif

// out[t] = Σ_c r[t][c]·w[c] for the block's kBlock rows.
template <typename T>
BEYOND_CLS_INLINE void dot_block(const T* const* r, const T* w, int64_t d, T* out) {
  static_assert(kBlock == 8, "dot_block is written out for 8 rows");
  const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5], *r6 = r[6], *r7 = r[7];
  T a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
  for (int64_t c = 0; c < d; ++c) {
    const T x = w[c];
    a0 += r0[c] * x;
    a1 += r1[c] * x;
    a2 += r2[c] * x;
    a3 += r3[c] * x;
    a4 += r4[c] * x;
    a5 += r5[c] * x;
    a6 += r6[c] * x;
    a7 += r7[c] * x;
  }
  out[0] = a0, out[1] = a1, out[2] = a2, out[3] = a3, out[4] = a4, out[5] = a5, out[6] = a6, out[7] = a7;
}

// y[c] += Σ_t e[t]·r[t][c] over the block's kBlock rows (summed as a tree).
template <typename T>
BEYOND_CLS_INLINE void axpy_block(T* y, const T* e, const T* const* r, int64_t d) {
  const T *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5], *r6 = r[6], *r7 = r[7];
  const T e0 = e[0], e1 = e[1], e2 = e[2], e3 = e[3], e4 = e[4], e5 = e[5], e6 = e[6], e7 = e[7];
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) {
    y[c] += ((e0 * r0[c] + e1 * r1[c]) + (e2 * r2[c] + e3 * r3[c])) +
            ((e4 * r4[c] + e5 * r5[c]) + (e6 * r6[c] + e7 * r7[c]));
  }
}

// e^x for x <= kLazyRescale (the lazy online softmax below); NaN stays NaN.
BEYOND_CLS_INLINE void exp_block(float* x) {
#pragma omp simd
  for (int t = 0; t < kBlock; ++t) x[t] = exp_nonpositive(x[t]);
}

BEYOND_CLS_INLINE void exp_block(double* x) {
  for (int t = 0; t < kBlock; ++t) x[t] = std::exp(x[t]);
}

// Lazy online softmax: the accumulator holds Σ e^(l_j − ref)·z_j against a reference `ref` that is
// moved (and the accumulator rescaled) only when a block's maximum exceeds it by more than this.
// The result is exact either way (the final division cancels ref); the threshold only bounds the
// accumulated terms by e^kLazyRescale, far from overflow. Logits of random rows rarely move ref
// after the first block, so the accumulator is almost never rescaled.
constexpr double kLazyRescale = 8.0;

// Forward of one batch row. raw [K, N] gets z·Wᵀ (bias not added; masked tokens 0, softmax_row
// masks them); pooled [K, D] = softmax-weighted sum of the kept rows. `zero_row` [D] of zeros pads
// the last block; `ref`, `total` [K] are scratch. Masked rows are skipped (never read).
template <typename T>
BEYOND_CLS_INLINE void abmilp_forward_row(const T* z, int64_t zs, int64_t n, int64_t d, const T* w, const T* bias,
                                          int64_t k, const bool* keep, const T* zero_row, T* raw, T* pooled, T* ref,
                                          T* total) {
  constexpr T kInf = std::numeric_limits<T>::infinity();
  const T lazy = static_cast<T>(kLazyRescale);
  std::fill(pooled, pooled + k * d, T(0));
  std::fill(ref, ref + k, -kInf);
  std::fill(total, total + k, T(0));
  if (keep != nullptr) {
    for (int64_t i = 0; i < k; ++i)
      for (int64_t j = 0; j < n; ++j)
        if (!keep[j]) raw[i * n + j] = T(0);
  }
  const T* rows[kBlock];
  int64_t idx[kBlock];
  int64_t j = 0;
  while (true) {
    int cnt = 0;  // gather the next kBlock kept rows
    for (; j < n && cnt < kBlock; ++j) {
      if (keep != nullptr && !keep[j]) continue;
      rows[cnt] = z + j * zs;
      idx[cnt++] = j;
    }
    if (cnt == 0) break;
    for (int t = cnt; t < kBlock; ++t) rows[t] = zero_row;
    for (int64_t i = 0; i < k; ++i) {
      T l[kBlock];
      dot_block(rows, w + i * d, d, l);
      const T b = bias ? bias[i] : T(0);
      T block_max = -kInf;
      for (int t = 0; t < cnt; ++t) {
        raw[i * n + idx[t]] = l[t];
        l[t] += b;
        block_max = l[t] > block_max ? l[t] : block_max;
      }
      T* acc = pooled + i * d;
      if (block_max > ref[i] + lazy || ref[i] == -kInf) {  // -inf: first kept block (or all -inf so far)
        if (ref[i] != -kInf && total[i] != T(0)) {
          const T scale = exp_nonpositive(ref[i] - block_max);
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) acc[c] *= scale;
          total[i] *= scale;
        }
        if (block_max > ref[i]) ref[i] = block_max;
      }
      for (int t = 0; t < kBlock; ++t) l[t] = t < cnt ? l[t] - ref[i] : -kInf;  // padding: e^-inf = 0
      exp_block(l);
      for (int t = 0; t < cnt; ++t) total[i] += l[t];
      axpy_block(acc, l, rows, d);
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    const T inv = total[i] > T(0) && std::isfinite(total[i]) ? T(1) / total[i] : std::numeric_limits<T>::quiet_NaN();
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) pooled[i * d + c] *= inv;
  }
}

// Backward of one batch row in one sweep over its tokens: t_j = g·z_j (+ gs_j) and
// dl_j = s_j (t_j − c) with c = Σ_j s_j t_j, and grad_weight's partial Σ_j dl_j z_j.
// c is only known after the sweep, so the sweep uses the estimate c0 = g·pooled (+ Σ s·gs), equal
// to c up to rounding (the forward's pooled is Σ_j s_j z_j): each block of rows gives its t_j and
// s_j (t_j − c0), which are added to the partial while the rows are in L1, and c is summed on the
// way. Then with δ = c − c0: dl_j −= s_j δ and partial −= δ·pooled (Σ_j s_j z_j), which gives the
// two-sweep dl = s·(t − c) of the softmax backward; the error of δ·(Σ s z − pooled) is below rounding.
//
// Σ_j dl_j is 0 in exact arithmetic, and any error common to all dl_j (−s_j·ε for an error ε in c)
// reaches grad_weight times pooled, large for a feature with a large mean (tokens whose feature 0
// falls from 0 to −98 give pooled ≈ −67 there on a near-uniform branch). So c = Σ s_j t_j / Σ s_j is summed
// in float64 (the float32 sum's error ε ≈ 1e-7·Σ|s_j t_j|) and divided by Σ s_j (float32 scores sum
// to 1 only within ~1e-7, which adds c·(Σ s − 1) to ε): Σ_j dl_j is then at the rounding of the dl_j.
// dl [K, N] is written (grad_tokens needs it); b_partial [K] = Σ_j dl_j in token order; `acc` [3K]
// is scratch.
template <typename T>
BEYOND_CLS_INLINE void abmilp_backward_row(const T* z, int64_t zs, int64_t n, int64_t d, const T* g, const T* p,
                                           const T* s, const T* gs, int64_t k, const T* zero_row, T* dl,
                                           T* w_partial, T* b_partial, double* acc) {
  double* st_sum = acc + k;     // Σ s_j t_j
  double* s_sum = acc + 2 * k;  // Σ s_j
  for (int64_t i = 0; i < k; ++i) {
    T ci = 0;
#pragma omp simd reduction(+ : ci)
    for (int64_t x = 0; x < d; ++x) ci += g[i * d + x] * p[i * d + x];
    if (gs != nullptr) {
      T cs = 0;
#pragma omp simd reduction(+ : cs)
      for (int64_t j = 0; j < n; ++j) cs += s[i * n + j] * gs[i * n + j];
      ci += cs;
    }
    acc[i] = ci;  // c0, exactly a T
    st_sum[i] = 0;
    s_sum[i] = 0;
  }
  std::fill(w_partial, w_partial + k * d, T(0));
  const T* rows[kBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int cnt = static_cast<int>(std::min<int64_t>(kBlock, n - j0));
    for (int t = 0; t < kBlock; ++t) rows[t] = t < cnt ? z + (j0 + t) * zs : zero_row;
    for (int64_t i = 0; i < k; ++i) {
      T e[kBlock];
      dot_block(rows, g + i * d, d, e);
      const T c0 = static_cast<T>(acc[i]);
      double st = 0, ss = 0;
      bool any = false;
      for (int t = 0; t < kBlock; ++t) {
        if (t >= cnt) {
          e[t] = T(0);
          continue;
        }
        const int64_t at = i * n + j0 + t;
        const T tj = gs != nullptr ? e[t] + gs[at] : e[t];
        st += static_cast<double>(s[at]) * static_cast<double>(tj);
        ss += static_cast<double>(s[at]);
        e[t] = s[at] * (tj - c0);  // masked tokens: s = 0, dl = 0
        dl[at] = e[t];
        any |= e[t] != T(0);
      }
      st_sum[i] += st;
      s_sum[i] += ss;
      if (any) axpy_block(w_partial + i * d, e, rows, d);
    }
  }
  for (int64_t i = 0; i < k; ++i) {
    const double c_row = s_sum[i] != 0 ? st_sum[i] / s_sum[i] : st_sum[i];  // all-zero scores: dl = 0
    const T delta = static_cast<T>(c_row - acc[i]);
    T* dl_i = dl + i * n;
    const T* s_i = s + i * n;
    T total = 0;
    for (int64_t j = 0; j < n; ++j) {  // in token order, as the two-sweep softmax backward sums it
      dl_i[j] -= s_i[j] * delta;
      total += dl_i[j];
    }
    b_partial[i] = total;
    if (delta != T(0)) {
      T* w_i = w_partial + i * d;
      const T* p_i = p + i * d;
#pragma omp simd
      for (int64_t x = 0; x < d; ++x) w_i[x] -= delta * p_i[x];
    }
  }
}

// The float rows, one clone per x86 ISA level (other targets: their baseline).
BEYOND_CLS_ISA_CLONES void abmilp_forward_row_f32(const float* z, int64_t zs, int64_t n, int64_t d, const float* w,
                                                  const float* bias, int64_t k, const bool* keep,
                                                  const float* zero_row, float* raw, float* pooled, float* ref,
                                                  float* total) {
  abmilp_forward_row<float>(z, zs, n, d, w, bias, k, keep, zero_row, raw, pooled, ref, total);
}

BEYOND_CLS_ISA_CLONES void abmilp_backward_row_f32(const float* z, int64_t zs, int64_t n, int64_t d, const float* g,
                                                   const float* p, const float* s, const float* gs, int64_t k,
                                                   const float* zero_row, float* dl, float* w_partial,
                                                   float* b_partial, double* acc) {
  abmilp_backward_row<float>(z, zs, n, d, g, p, s, gs, k, zero_row, dl, w_partial, b_partial, acc);
}

void forward_row(const float* z, int64_t zs, int64_t n, int64_t d, const float* w, const float* bias, int64_t k,
                 const bool* keep, const float* zero_row, float* raw, float* pooled, float* ref, float* total) {
  abmilp_forward_row_f32(z, zs, n, d, w, bias, k, keep, zero_row, raw, pooled, ref, total);
}

void forward_row(const double* z, int64_t zs, int64_t n, int64_t d, const double* w, const double* bias, int64_t k,
                 const bool* keep, const double* zero_row, double* raw, double* pooled, double* ref, double* total) {
  abmilp_forward_row<double>(z, zs, n, d, w, bias, k, keep, zero_row, raw, pooled, ref, total);
}

void backward_row(const float* z, int64_t zs, int64_t n, int64_t d, const float* g, const float* p, const float* s,
                  const float* gs, int64_t k, const float* zero_row, float* dl, float* w_partial, float* b_partial,
                  double* acc) {
  abmilp_backward_row_f32(z, zs, n, d, g, p, s, gs, k, zero_row, dl, w_partial, b_partial, acc);
}

void backward_row(const double* z, int64_t zs, int64_t n, int64_t d, const double* g, const double* p,
                  const double* s, const double* gs, int64_t k, const double* zero_row, double* dl,
                  double* w_partial, double* b_partial, double* acc) {
  abmilp_backward_row<double>(z, zs, n, d, g, p, s, gs, k, zero_row, dl, w_partial, b_partial, acc);
}

// ---------------------------------------------------------------------------------------------
// Kernels. `weight` is undefined for softmax_pool, `logits` for AbMILP.

// One batch row of tokens as an acc_t [N, D] matrix with unit feature stride: a view when tokens
// are acc_t with unit feature stride already, else a per-thread converted copy.
template <typename acc_t>
struct TokenRows {
  const at::Tensor& tokens;
  at::Tensor buffer;
  TokenRows(const at::Tensor& t, at::ScalarType acc) : tokens(t) {
    if (t.scalar_type() != acc || t.stride(2) != 1) buffer = at::empty({t.size(1), t.size(2)}, t.options().dtype(acc));
  }
  at::Tensor operator[](int64_t b) {
    if (!buffer.defined()) return tokens[b];
    buffer.copy_(tokens[b]);
    return buffer;
  }
  // (first row, row stride) of batch row b.
  std::pair<const acc_t*, int64_t> rows(int64_t b) {
    if (!buffer.defined()) return {tokens.const_data_ptr<acc_t>() + b * tokens.stride(0), tokens.stride(1)};
    buffer.copy_(tokens[b]);
    return {buffer.const_data_ptr<acc_t>(), buffer.stride(0)};
  }
};

// Batch row b of an acc_t [B, K, D] tensor with any strides (e.g. the expanded gradient of a sum)
// as a contiguous [K, D] pointer: the tensor's own memory when it is, else a copy into `buffer`
// (per thread; no whole-tensor .contiguous() pass before the kernel).
template <typename acc_t>
const acc_t* batch_row(const at::Tensor& t, int64_t b, std::vector<acc_t>& buffer) {
  const int64_t k = t.size(1), d = t.size(2);
  const acc_t* base = t.const_data_ptr<acc_t>() + b * t.stride(0);
  if (t.stride(2) == 1 && (k == 1 || t.stride(1) == d)) return base;
  buffer.resize(k * d);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t c = 0; c < d; ++c) buffer[i * d + c] = base[i * t.stride(1) + c * t.stride(2)];
  return buffer.data();
}

template <typename acc_t>
void pool_forward(const at::Tensor& tokens, const at::Tensor& weight, const at::Tensor& bias,
                  const at::Tensor& logits, const at::Tensor& keep, at::Tensor& scores, at::Tensor& pooled) {
  const int64_t batch = tokens.size(0), n = tokens.size(1), d = tokens.size(2), k = scores.size(1);
  const auto acc = scores.scalar_type();
  const bool* keep_ptr = keep.defined() ? keep.const_data_ptr<bool>() : nullptr;
  const acc_t* bias_ptr = bias.defined() ? bias.const_data_ptr<acc_t>() : nullptr;
  acc_t* scores_ptr = scores.data_ptr<acc_t>();
  acc_t* pooled_ptr = pooled.data_ptr<acc_t>();  // contiguous [B, K, D] acc_t

  parallel_rows(batch, n * d * k, [&](RowQueue& queue) {
    TokenRows<acc_t> rows(tokens, acc);
    std::vector<acc_t> zero_row(weight.defined() ? d : 0, acc_t(0)), ref(k), total(k);
    for (int64_t b; (b = queue.next()) >= 0;) {
      acc_t* sp = scores_ptr + b * k * n;
      const bool* keep_b = keep_ptr ? keep_ptr + b * n : nullptr;
      if (weight.defined()) {  // one sweep over the token rows: logits and pooled together
        const auto [z, zs] = rows.rows(b);
        forward_row(z, zs, n, d, weight.const_data_ptr<acc_t>(), bias_ptr, k, keep_b, zero_row.data(), sp,
                    pooled_ptr + b * k * d, ref.data(), total.data());
        for (int64_t i = 0; i < k; ++i) softmax_row<acc_t>(sp + i * n, n, bias_ptr ? bias_ptr[i] : acc_t(0), keep_b);
        continue;
      }
      at::Tensor s = scores[b];
      s.copy_(logits[b]);
      for (int64_t i = 0; i < k; ++i) softmax_row<acc_t>(sp + i * n, n, acc_t(0), keep_b);
      at::Tensor p = pooled[b];
      at::mm_out(p, s, rows[b]);
    }
  });
}

// grad_logits: [B, K, N] acc_t output (softmax_pool) or undefined (AbMILP: dl stays per-thread).
// weight_partial [B, K, D] and bias_partial [B, K]: per-row grad_weight / grad_bias (AbMILP).
// grad_pooled and pooled are acc_t with any strides; scores and grad_scores contiguous acc_t.
template <typename acc_t>
void pool_backward(const at::Tensor& grad_pooled, const at::Tensor& grad_scores, const at::Tensor& tokens,
                   const at::Tensor& weight, const at::Tensor& scores, const at::Tensor& pooled, at::Tensor& grad_tokens,
                   at::Tensor& grad_logits, at::Tensor& weight_partial, at::Tensor& bias_partial) {
  const int64_t batch = tokens.size(0), n = tokens.size(1), d = tokens.size(2), k = scores.size(1);
  const auto acc = scores.scalar_type();
  const bool abmilp = weight.defined(), tokens_grad = grad_tokens.numel() > 0;
  const acc_t* scores_ptr = scores.const_data_ptr<acc_t>();
  const acc_t* gs_ptr = grad_scores.defined() ? grad_scores.const_data_ptr<acc_t>() : nullptr;
  acc_t* weight_partial_ptr = abmilp ? weight_partial.data_ptr<acc_t>() : nullptr;
  acc_t* bias_partial_ptr = abmilp ? bias_partial.data_ptr<acc_t>() : nullptr;

  parallel_rows(batch, n * d * k, [&](RowQueue& queue) {
    TokenRows<acc_t> rows(tokens, acc);
    // AbMILP: `stack` = [s; dl] [2K, N] and `right` = [g_b; W] [2K, D], so that
    // grad_tokens_b = sᵀ·g_b + dlᵀ·W is one GEMM with inner size 2K.
    at::Tensor stack, right, dl_tile;
    std::vector<acc_t> zero_row, g_buffer, p_buffer;
    std::vector<double> c_scratch;
    if (abmilp) {
      stack = at::empty({2 * k, n}, scores.options());
      dl_tile = stack.narrow(0, k, k);
      zero_row.assign(d, acc_t(0));
      c_scratch.resize(3 * k);
      if (tokens_grad) {
        right = at::empty({2 * k, d}, scores.options());
        right.narrow(0, k, k).copy_(weight);
      }
    }
    at::Tensor tokens_acc;  // acc_t staging for low-precision grad_tokens
    if (tokens_grad && grad_tokens.scalar_type() != acc) tokens_acc = at::empty({n, d}, scores.options());

    for (int64_t b; (b = queue.next()) >= 0;) {
      at::Tensor dl = abmilp ? dl_tile : grad_logits[b];
      if (abmilp) {  // one sweep over the token rows for dl, grad_weight and grad_bias
        const auto [z, zs] = rows.rows(b);
        backward_row(z, zs, n, d, batch_row(grad_pooled, b, g_buffer), batch_row(pooled, b, p_buffer),
                     scores_ptr + b * k * n, gs_ptr ? gs_ptr + b * k * n : nullptr, k, zero_row.data(),
                     dl.data_ptr<acc_t>(), weight_partial_ptr + b * k * d, bias_partial_ptr + b * k,
                     c_scratch.data());
      } else {
        at::mm_out(dl, grad_pooled[b], rows[b].t());  // gz = g_b·z_bᵀ [K, N]
        acc_t* dlp = dl.data_ptr<acc_t>();
        for (int64_t i = 0; i < k; ++i) {
          const int64_t row = (b * k + i) * n;
          softmax_backward_row<acc_t>(dlp + i * n, scores_ptr + row, gs_ptr ? gs_ptr + row : nullptr, n);
        }
      }
      if (!tokens_grad) continue;
      const at::Tensor g = grad_pooled[b], s = scores[b];
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
  // grad_pooled and pooled keep their strides: an expanded gradient (of a sum) is read per row in
  // the kernel rather than materialized by a parallel copy first.
  const at::Tensor g = grad_pooled.to(acc);
  const at::Tensor s = scores.to(acc).contiguous();
  const at::Tensor gs = grad_scores.has_value() ? grad_scores->to(acc).contiguous() : at::Tensor();
  const at::Tensor w = weight.defined() ? weight.to(acc).contiguous() : at::Tensor();
  const at::Tensor p = pooled.to(acc);
  at::Tensor grad_tokens = tokens_grad ? at::empty({batch, n, d}, tokens.options()) : at::empty({0}, tokens.options());
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
