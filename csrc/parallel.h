// at::parallel_for for kernels that run ATen ops in their tasks.
//
// Worker threads start in the default autograd modes, not the caller's: a task that writes into
// outputs allocated under torch.inference_mode, or calls out= GEMMs on tensors that require grad,
// must take the caller's inference mode and disable grad itself.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>

#include <cstdint>

namespace beyond_cls {

template <typename F>
void parallel_tasks(int64_t begin, int64_t end, int64_t grain, const F& task) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(begin, end, grain, [&](int64_t first, int64_t last) {
    const c10::InferenceMode inference_mode(inference);
    const at::NoGradGuard no_grad;
    task(first, last);
  });
}

}  // namespace beyond_cls
