// Operator schemas of the beyond_cls library and the Python module that loads them.
//
// Implementations register per device in their own files (TORCH_LIBRARY_IMPL); fake (meta)
// implementations for tracing live in beyond_cls/_ops_meta.py.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(beyond_cls, m) {
  m.def(
      "attention_with_stats(Tensor q, Tensor k, Tensor v, int num_prefix_tokens=1, float? scale=None, "
      "Tensor? bias=None) -> (Tensor out, Tensor self_attn, Tensor cls_attn, Tensor patch_mass, "
      "Tensor patch_entropy)");
}

// Analysis is inference: the forward runs under autograd, a backward through it raises a clear error.
TORCH_LIBRARY_IMPL(beyond_cls, Autograd, m) {
  m.impl("attention_with_stats", torch::autograd::autogradNotImplementedFallback());
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "beyond_cls C++ ops; importing this module registers torch.ops.beyond_cls.*";
}
