// Operator schemas of the beyond_cls library and the Python module that loads them.
//
// Implementations register per device in their own files (TORCH_LIBRARY_IMPL). These are the CPU
// kernels: Python calls them only inside its own custom ops (beyond_cls/ops/), which carry the
// fakes and the autograd, so they need neither here.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(beyond_cls, m) {
  // Fused attention + row statistics, stats [S, B, H, N] stacked in the order of
  // beyond_cls/statistics.py's ROW_STATISTICS; kept_rows [B, H, R, N] holds the full softmax rows of the
  // queries in keep_rows ([B, H, 0, N] without it), from the same pass.
  m.def(
      "attention_with_stats(Tensor q, Tensor k, Tensor v, int num_prefix_tokens=1, float? scale=None, "
      "Tensor? bias=None, int[]? keep_rows=None) -> (Tensor out, Tensor stats, Tensor kept_rows)");
  // Softmax-weighted pooling (AbMILP, Eq. 5, with K score branches; or given logits): forward and
  // backward per op, autograd wired on the Python side. grad_tokens is empty unless tokens_grad.
  m.def(
      "abmilp_forward(Tensor tokens, Tensor weight, Tensor bias, Tensor? mask=None) -> (Tensor pooled, "
      "Tensor scores)");
  m.def(
      "abmilp_backward(Tensor grad_pooled, Tensor? grad_scores, Tensor tokens, Tensor weight, Tensor scores, "
      "Tensor pooled, bool tokens_grad) -> (Tensor grad_tokens, Tensor grad_weight, Tensor grad_bias)");
  m.def("softmax_pool_forward(Tensor tokens, Tensor logits, Tensor? mask=None) -> (Tensor pooled, Tensor scores)");
  m.def(
      "softmax_pool_backward(Tensor grad_pooled, Tensor? grad_scores, Tensor tokens, Tensor scores, "
      "Tensor pooled, bool tokens_grad) -> (Tensor grad_tokens, Tensor grad_logits)");
}

// Analysis is inference: the forward runs under autograd, a backward through it raises a clear error.
// The pooling ops get their derivatives from their *_backward ops on the Python side; called directly
// on tensors that require grad, they run and a backward through them raises.
TORCH_LIBRARY_IMPL(beyond_cls, Autograd, m) {
  m.impl("attention_with_stats", torch::autograd::autogradNotImplementedFallback());
  for (const char* op : {"abmilp_forward", "abmilp_backward", "softmax_pool_forward", "softmax_pool_backward"}) {
    m.impl(op, torch::autograd::autogradNotImplementedFallback());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "beyond_cls C++ ops; importing this module registers torch.ops.beyond_cls.*";
}
