// CPU kernel of beyond_cls::attention_with_stats.
//
// Work is split over (batch·head, block of query rows) with at::parallel_for; a block covers all
// rows when the [rows, N] score tile is small (ViT sizes), so each task is two GEMMs (q·kᵀ and p·v)
// around one pass over its rows. The row pass turns logits into probabilities in place and
// reduces them to exact statistics: patch keys are exponentiated relative to the patch-only
// maximum, so the patch entropy and mass stay exact even when prefix tokens take almost all of
// the attention. Row loops are vectorized by the compiler (see row_math.h). Kept rows (keep_rows)
// are the probabilities of their tile row, copied out between the row pass and p·v.
#include "attention_stats.h"

#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "parallel.h"
#include "row_math.h"

namespace beyond_cls {
namespace {

constexpr int64_t kTileElements = 1 << 16;  // score tile per task: 256 KiB of float32

struct RowStats {
  float self_attn, cls_attn, patch_mass, patch_entropy;
};

// Exponentiates one row of logits in place and returns its statistics and the factor that turns
// the row's p·V product into the attention output. Patch keys become e^(s - mp) (mp: patch max),
// prefix keys the same scale when that cannot overflow; otherwise (prefix logits exceed every
// patch logit by more than kMaxShift) the row is rescaled to the global max.
template <typename acc_t>
std::pair<RowStats, acc_t> exponentiate_row(acc_t* s, int64_t n, int64_t prefix, int64_t row) {
  constexpr acc_t kMaxShift = sizeof(acc_t) == 4 ? 80 : 700;
  const acc_t self_logit = s[row], first_logit = s[0];
  const acc_t prefix_max = max_of(s, prefix);
  const acc_t patch_max = max_of(s + prefix, n - prefix);
  const acc_t row_max = std::max(prefix_max, patch_max);

  // patch keys relative to the patch maximum: z_p = Σ e^(s-mp), t_p = Σ e^(s-mp)(s-mp)
  const auto [z_patch, t_patch] = exp_shift_sums(s + prefix, n - prefix, patch_max);
  acc_t z_prefix = 0;  // relative to the row maximum
  for (int64_t j = 0; j < prefix; ++j) z_prefix += std::exp(s[j] - row_max);
  const acc_t patch_scale = std::exp(patch_max - row_max);  // e^(mp - m) <= 1
  const acc_t z_total = z_prefix + z_patch * patch_scale;   // relative to the row maximum

  RowStats r;
  r.self_attn = static_cast<float>(std::exp(self_logit - row_max) / z_total);
  r.cls_attn = static_cast<float>(std::exp(first_logit - row_max) / z_total);
  r.patch_mass = static_cast<float>(z_patch * patch_scale / z_total);
  r.patch_entropy = static_cast<float>(std::log(z_patch) - t_patch / z_patch);

  if (row_max - patch_max <= kMaxShift) {  // the whole row on the patch scale
    for (int64_t j = 0; j < prefix; ++j) s[j] = std::exp(s[j] - patch_max);
    return {r, patch_scale / z_total};
  }
  for (int64_t j = 0; j < prefix; ++j) s[j] = std::exp(s[j] - row_max);
  scale_in_place(s + prefix, n - prefix, patch_scale);
  return {r, acc_t(1) / z_total};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  int64_t num_prefix_tokens, const std::optional<at::Tensor>& bias) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"q", q}, {"k", k}, {"v", v}}) {
    TORCH_CHECK(t.device().is_cpu(), "attention_with_stats (C++): ", name, " must be a CPU tensor, got ",
                t.device());
    TORCH_CHECK(t.dim() == 4, "attention_with_stats: ", name, " must be [B, H, N, d], got ", t.sizes());
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf,
                "attention_with_stats (C++): ", name, " must be float32/float64/bfloat16/float16, got ", dt);
  }
  TORCH_CHECK(q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "attention_with_stats: q, k, v must have one shape [B, H, N, d], got q ", q.sizes(), ", k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention_with_stats: q, k, v must share a dtype, got ", q.scalar_type(), ", ",
              k.scalar_type(), ", ", v.scalar_type());
  const int64_t n = q.size(2);
  TORCH_CHECK(n > 0 && q.size(3) > 0, "attention_with_stats: empty sequence or head dim, q is ", q.sizes());
  TORCH_CHECK(num_prefix_tokens >= 0 && num_prefix_tokens < n, "attention_with_stats: num_prefix_tokens ",
              "must be in [0, N-1] = [0, ", n - 1, "], got ", num_prefix_tokens);
  if (bias.has_value()) {
    const auto& b = *bias;
    TORCH_CHECK(b.device().is_cpu(), "attention_with_stats (C++): bias must be a CPU tensor");
    TORCH_CHECK(b.dim() <= 4, "attention_with_stats: bias must broadcast to [B, H, N, N], got ", b.sizes());
    TORCH_CHECK(at::is_floating_point(b), "attention_with_stats: bias must be floating point, got ",
                b.scalar_type());
    const std::vector<int64_t> full{q.size(0), q.size(1), n, n};
    const auto bs = b.sizes();
    for (const auto i : c10::irange(bs.size())) {
      const int64_t want = full[4 - bs.size() + i];
      TORCH_CHECK(bs[i] == want || bs[i] == 1, "attention_with_stats: bias of shape ", bs,
                  " does not broadcast to [B, H, N, N] = ", at::IntArrayRef(full));
    }
  }
}

// keep_rows as indices in [0, n), order kept; checks count, range and distinctness.
std::vector<int64_t> kept_row_indices(at::OptionalIntArrayRef keep_rows, int64_t n) {
  std::vector<int64_t> rows;
  if (!keep_rows.has_value()) return rows;
  TORCH_CHECK(static_cast<int64_t>(keep_rows->size()) <= kMaxKeptRows, "attention_with_stats: keep_rows holds ",
              keep_rows->size(), " indices, at most ", kMaxKeptRows, " are supported");
  for (const int64_t i : *keep_rows) {
    TORCH_CHECK(i >= -n && i < n, "attention_with_stats: keep_rows index ", i, " is outside [-", n, ", ", n,
                ") for N=", n, " tokens");
    const int64_t row = i < 0 ? i + n : i;
    TORCH_CHECK(std::find(rows.begin(), rows.end(), row) == rows.end(), "attention_with_stats: keep_rows ",
                *keep_rows, " name query ", row, " twice");
    rows.push_back(row);
  }
  return rows;
}

template <typename acc_t>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias, bool has_bias,
         int64_t prefix, double scale, at::Tensor& out, at::Tensor& stats, const std::vector<int64_t>& kept_index,
         at::Tensor& kept) {
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2);
  const int64_t num_kept = static_cast<int64_t>(kept_index.size());
  float* kept_ptr = num_kept > 0 ? kept.data_ptr<float>() : nullptr;
  const int64_t block = std::clamp<int64_t>(kTileElements / n, 16, n);
  const int64_t q_blocks = (n + block - 1) / block;
  float* const rows_base = stats.data_ptr<float>();  // [S, B, H, N]: one [B, H, N] plane per row statistic
  const int64_t plane = batch * heads * n;
  float* self_ptr = rows_base + kSelfAttnRow * plane;
  float* cls_ptr = rows_base + kClsAttnRow * plane;
  float* mass_ptr = rows_base + kPatchMassRow * plane;
  float* entropy_ptr = rows_base + kPatchEntropyRow * plane;

  parallel_tasks(0, batch * heads * q_blocks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({block, n}, q.options());
    at::Tensor scales = at::empty({block}, q.options());
    acc_t* row_scale = scales.data_ptr<acc_t>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / q_blocks, i0 = (task % q_blocks) * block;
      const int64_t b = bh / heads, h = bh % heads, rows = std::min(block, n - i0);
      at::Tensor s = tile.narrow(0, 0, rows);
      const at::Tensor q_rows = q[b][h].narrow(0, i0, rows), k_t = k[b][h].t();
      if (has_bias) {  // s = bias + scale·q·kᵀ in one GEMM
        s.copy_(bias[b][h].narrow(0, i0, rows));
        at::addmm_out(s, s, q_rows, k_t, /*beta=*/1, /*alpha=*/scale);
      } else {
        at::addmm_out(s, s, q_rows, k_t, /*beta=*/0, /*alpha=*/scale);
      }
      acc_t* sp = s.data_ptr<acc_t>();
      for (int64_t r = 0; r < rows; ++r) {
        const auto [st, out_scale] = exponentiate_row<acc_t>(sp + r * n, n, prefix, i0 + r);
        row_scale[r] = out_scale;
        const int64_t at_row = bh * n + i0 + r;
        self_ptr[at_row] = st.self_attn;
        cls_ptr[at_row] = st.cls_attn;
        mass_ptr[at_row] = st.patch_mass;
        entropy_ptr[at_row] = st.patch_entropy;
      }
      for (int64_t slot = 0; slot < num_kept; ++slot) {  // kept rows: probabilities = tile row · row scale
        const int64_t r = kept_index[slot] - i0;
        if (r < 0 || r >= rows) continue;
        const acc_t* e = sp + r * n;
        const acc_t f = row_scale[r];
        float* dst = kept_ptr + (bh * num_kept + slot) * n;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(e[j] * f);
      }
      at::Tensor o = out[b][h].narrow(0, i0, rows);
      at::mm_out(o, s, v[b][h]);
      o.mul_(scales.narrow(0, 0, rows).unsqueeze(1));
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_with_stats_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t num_prefix_tokens,
    std::optional<double> scale, const std::optional<at::Tensor>& bias, at::OptionalIntArrayRef keep_rows) {
  check_inputs(q, k, v, num_prefix_tokens, bias);
  const std::vector<int64_t> kept_index = kept_row_indices(keep_rows, q.size(2));
  const at::NoGradGuard no_grad;  // forward-only op: the GEMMs below write into out= buffers
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t batch = q.size(0), heads = q.size(1), n = q.size(2), d = q.size(3);
  const double sc = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));

  // GEMMs read strided views directly; only a dtype change copies.
  const at::Tensor qa = q.to(acc), ka = k.to(acc), va = v.to(acc);
  at::Tensor b4;
  if (bias.has_value()) b4 = bias->to(acc).expand({batch, heads, n, n});
  // stored [B, N, H, d], returned as the [B, H, N, d] view (SDPA's layout): merging heads is a free view
  at::Tensor out = at::empty({batch, n, heads, d}, q.options().dtype(acc)).transpose(1, 2);
  const auto stat_options = q.options().dtype(at::kFloat);
  at::Tensor stats = at::empty({kNumRowStatistics, batch, heads, n}, stat_options);
  at::Tensor kept = at::empty({batch, heads, static_cast<int64_t>(kept_index.size()), n}, stat_options);

  if (acc == at::kDouble) {
    run<double>(qa, ka, va, b4, bias.has_value(), num_prefix_tokens, sc, out, stats, kept_index, kept);
  } else {
    run<float>(qa, ka, va, b4, bias.has_value(), num_prefix_tokens, sc, out, stats, kept_index, kept);
  }
  return {out.to(v.scalar_type()), stats, kept};  // .to keeps the strides
}

TORCH_LIBRARY_IMPL(beyond_cls, CPU, m) {
  m.impl("attention_with_stats", &attention_with_stats_cpu);
}

}  // namespace beyond_cls
