// What the CPU kernels (cpu_attention.cc, cpu_conv.cc) share: running items on XLA's intra-op threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace klein {

// Runs body(i) for i in [0, count) on the caller and XLA's intra-op threads. Items are claimed from a shared counter,
// so a task the pool starts late finds nothing left, and the caller waits only for items already being run.
template <typename Body>
void parallel_for(xla::ffi::ThreadPool& pool, int64_t count, const Body& body) {
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  // A task owns a reference to `progress`; it touches `body` only while items remain, i.e. before we return.
  auto work = [progress, count, &body] {
    for (int64_t i; (i = progress->next.fetch_add(1)) < count;) {
      body(i);
      progress->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < std::min<int64_t>(pool.num_threads(), count); ++t) pool.Schedule(decltype(work)(work));
  work();
  while (progress->done.load(std::memory_order_acquire) < count) std::this_thread::yield();
}

}  // namespace klein
