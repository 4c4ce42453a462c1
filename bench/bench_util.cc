#include "bench/bench_util.h"

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

#include <fmt/format.h>

namespace lazyblock {

double percentile(const std::vector<double>& sorted, double fraction) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(fraction * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

double process_cpu_seconds() {
  rusage usage{};
  ::getrusage(RUSAGE_SELF, &usage);
  const auto seconds = [](const timeval& t) {
    return static_cast<double>(t.tv_sec) + static_cast<double>(t.tv_usec) / 1e6;
  };
  return seconds(usage.ru_utime) + seconds(usage.ru_stime);
}

Result<double> measure_new_memory(int threads, uint64_t bytes) {
  const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t each =
      std::max<uint64_t>(page, bytes / static_cast<uint64_t>(threads) / page * page);
  std::atomic<bool> unmapped{false};
  std::vector<std::thread> touchers;
  const auto begin = std::chrono::steady_clock::now();
  for (int t = 0; t < threads; ++t) {
    touchers.emplace_back([each, page, &unmapped] {
      void* map = ::mmap(nullptr, each, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (map == MAP_FAILED) {
        unmapped.store(true, std::memory_order_relaxed);
        return;
      }
      auto* bytes = static_cast<volatile char*>(map);
      for (uint64_t at = 0; at < each; at += page) bytes[at] = 1;
      ::munmap(map, each);
    });
  }
  for (std::thread& toucher : touchers) toucher.join();
  const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - begin;
  if (unmapped.load()) {
    return Status::io_error(
        fmt::format("bench: could not map {} bytes of new memory to measure its rate", each));
  }
  return static_cast<double>(each * static_cast<uint64_t>(threads)) / std::max(1e-9, spent.count());
}

}  // namespace lazyblock
