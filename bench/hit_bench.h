// `lazyblock bench hit`: the cost of a read whose blocks are already cached.
//
// A 64 MiB object is read once through a chunker (so every block is
// cached), then threads read random 4 KiB blocks through slice() (a view, no
// copy) and read_at() (a copy). Each sample times a run of kCallsPerSample
// calls, so that the clock's own cost is spread thin; the figures are per
// call. No lock that a fetch holds is taken on this path. The disk rows
// make the same calls through image::Disk (cached_view, read) of a device
// whose header maps pieces of several builds: the extent table's cost. The
// chunker's and the disk's calls take turns, round after round, so that
// their ratio holds on a loaded machine.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace lazyblock {

struct HitResult {
  std::string name;  // "slice" or "read_at"
  int threads = 0;
  double median_ns = 0;
  double p99_ns = 0;
};

struct HitBenchReport {
  std::vector<HitResult> results;  // the chunker's: "slice", "read_at"
  std::vector<HitResult> disk;     // image::Disk's: "cached_view", "read"
};

// Runs each call from 1 and 2 threads.
Result<HitBenchReport> run_hit_bench();

std::string format_hit_report(const HitBenchReport& report);
nlohmann::json hit_report_json(const HitBenchReport& report);

}  // namespace lazyblock
