// parallel_for for the CPU twins that really runs on torch's intra-op threads.
//
// torch's at::parallel_for is a header template; with the OpenMP backend (the pip wheels) its body is a
// `#pragma omp parallel`, which a source built without -fopenmp (this extension's flags) compiles as a plain serial
// loop. This helper opens the parallel region itself through libgomp's entry point GOMP_parallel (what that pragma
// compiles to), resolved at load time from the libgomp torch ships and links (the same thread team torch's own
// kernels use), with at::get_num_threads() threads, so torch.set_num_threads applies. The symbols are weak: where
// torch has no libgomp (another parallel backend) it falls back to at::parallel_for. CPU only.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <exception>
#include <mutex>

extern "C" {
void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) __attribute__((weak));
int omp_get_thread_num(void) __attribute__((weak));
int omp_get_num_threads(void) __attribute__((weak));
}

namespace mmk {
namespace cpu {

// f(b, e) over pieces of [begin, end), each at least `grain` long (except the last), on up to at::get_num_threads()
// threads; serial inside another parallel region. The first exception thrown by f is rethrown here.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const int64_t n = end - begin;
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (n + grain - 1) / grain);
  if (threads <= 1 || GOMP_parallel == nullptr || omp_get_thread_num == nullptr || omp_get_num_threads == nullptr ||
      at::in_parallel_region()) {
    at::parallel_for(begin, end, grain, f);
    return;
  }
  struct Region {
    const F* f;
    int64_t begin, end;
    std::exception_ptr error;
    std::mutex lock;
  } region{&f, begin, end, nullptr, {}};
  GOMP_parallel(
      [](void* data) {
        Region& r = *static_cast<Region*>(data);
        const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t piece = (r.end - r.begin + nt - 1) / nt;
        const int64_t b = r.begin + tid * piece, e = std::min(r.end, b + piece);
        if (b >= e) return;
        try {
          (*r.f)(b, e);
        } catch (...) {
          std::lock_guard<std::mutex> guard(r.lock);
          if (!r.error) r.error = std::current_exception();
        }
      },
      &region, static_cast<unsigned>(threads), 0u);
  if (region.error) std::rethrow_exception(region.error);
}

}  // namespace cpu
}  // namespace mmk
