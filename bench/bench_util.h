// Small pieces the benchmarks share.
#pragma once

#include <cstdint>
#include <vector>

#include "common/status.h"

namespace lazyblock {

// The nearest-rank percentile (`fraction` in (0, 1]) of `sorted`, which is
// sorted ascending; 0 if empty.
double percentile(const std::vector<double>& sorted, double fraction);

// User and system CPU time of this process so far, in seconds.
double process_cpu_seconds();

// Bytes per second at which `threads` threads at once get new memory from
// the system: each maps bytes / threads of anonymous memory and writes one
// byte per page of it. What a fill of a cold cache pays per page on top of
// its copy; on some virtual machines (a guest whose first touch of a page
// traps to the host) it binds before the cores or the network do. Fails if
// the memory cannot be mapped.
Result<double> measure_new_memory(int threads, uint64_t bytes);

}  // namespace lazyblock
