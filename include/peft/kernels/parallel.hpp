// peft/kernels/parallel.hpp — OpenMP threading for the kernels, optional.
//
// Built with OpenMP (CMake links OpenMP::OpenMP_CXX into peft::peft when it is found), the
// kernels split their output over threads; without it everything runs on the calling thread.
// The thread count is OpenMP's (OMP_NUM_THREADS, omp_set_num_threads).
#pragma once

#include <algorithm>

#include "peft/core/matrix_view.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace peft::kernels {

/// Threads a parallel kernel may use.
inline int max_threads() noexcept {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

/// Whether the caller already runs inside a parallel region (kernels then stay serial).
inline bool in_parallel() noexcept {
#ifdef _OPENMP
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

/// Calls f(first, last) over [0, n) split into chunks of `grain` (a multiple of it, except the
/// tail), one contiguous range per thread. Runs serially when `work` (a flop estimate) is too small
/// to pay for waking threads, without OpenMP, or inside another parallel region.
template <class F>
void parallel_ranges(index n, index grain, double work, F&& f) {
  if (n <= 0) return;
  grain = std::max<index>(grain, 1);
  const index chunks = (n + grain - 1) / grain;
  int threads = max_threads();
  if (work < 2.0e5 || in_parallel()) threads = 1;
  threads = static_cast<int>(std::min<index>(threads, chunks));
  if (threads <= 1) {
    f(index{0}, n);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(threads)
  {
    const index t = omp_get_thread_num();
    const index per = (chunks + threads - 1) / threads;
    const index first = std::min(n, t * per * grain);
    const index last = std::min(n, (t + 1) * per * grain);
    if (first < last) f(first, last);
  }
#else
  f(index{0}, n);
#endif
}

}  // namespace peft::kernels
