// at::parallel_for for kernels that run ATen ops in their tasks.
//
// Worker threads start in the default autograd modes, not the caller's: a task that writes into
// outputs allocated under torch.inference_mode, or calls out= GEMMs on tensors that require grad,
// must take the caller's inference mode and disable grad itself.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <atomic>
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

// Rows [0, n) handed out one at a time to the threads of one parallel region.
class RowQueue {
 public:
  explicit RowQueue(int64_t n) : n_(n) {}
  // The next unclaimed row, or -1 when all are taken.
  int64_t next() {
    const int64_t row = next_.fetch_add(1, std::memory_order_relaxed);
    return row < n_ ? row : -1;
  }

 private:
  const int64_t n_;
  std::atomic<int64_t> next_{0};
};

// Runs task(queue) once per thread of one region (per-thread scratch goes before its loop over
// queue.next()). Rows are claimed dynamically rather than split in fixed chunks, so a thread that
// starts late (descheduled on a busy machine) takes fewer rows instead of leaving its whole chunk
// to be waited for. Which thread computes a row does not change the row's result. `row_work`
// (elements a row touches) keeps small calls on the calling thread: each thread gets at least
// kMinThreadWork elements, ATen's own grain (at::internal::GRAIN_SIZE), so no region is opened
// for work that a wake-up of the other threads would outweigh.
constexpr int64_t kMinThreadWork = 32768;

template <typename F>
void parallel_rows(int64_t n, int64_t row_work, const F& task) {
  RowQueue queue(n);
  const int64_t by_work = std::max<int64_t>(1, n * std::max<int64_t>(row_work, 1) / kMinThreadWork);
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({n, by_work, at::get_num_threads()}));
  parallel_tasks(0, threads, 1, [&](int64_t, int64_t) { task(queue); });
}

}  // namespace beyond_cls
