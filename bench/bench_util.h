// Small pieces the benchmarks share.
#pragma once

#include <vector>

namespace lazyblock {

// The nearest-rank percentile (`fraction` in (0, 1]) of `sorted`, which is
// sorted ascending; 0 if empty.
double percentile(const std::vector<double>& sorted, double fraction);

// User and system CPU time of this process so far, in seconds.
double process_cpu_seconds();

}  // namespace lazyblock
