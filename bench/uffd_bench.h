// `lazyblock bench uffd`: the UFFD handler as a restored VM meets it, in one
// process: a stand-in Firecracker (testing/firecracker_stand_in.h) touches
// guest memory served by a UffdServer from a packed memfile behind a
// simulated store.
//
// It measures:
//   cold faults   single pages of a cold memfile, one at a time: latency
//                 p50/p99 beside the limit TTFB + page/BW;
//   warm faults   pages already cached: p50/p99, beside a minimal
//                 single-threaded handler (poll, read, UFFDIO_COPY from an
//                 mmapped file) measured in the same run, rounds interleaved;
//   working set   the time for vCPUs to sweep a working set (chunk-aligned
//                 runs) on a cold memfile, without prefetch (recording it),
//                 then with the record prefetched, beside the limit
//                 TTFB + working-set bytes / (streams x per-stream bandwidth).
// Every page touched is checked byte for byte.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"
#include "storage/simulate_store.h"

namespace lazyblock {

struct UffdBenchOptions {
  std::string profile_name;
  SimulateProfile profile;
  uint64_t memfile_size = 256ULL << 20;
  uint64_t working_set = 32ULL << 20;
  int cold_faults = 24;
  int warm_faults = 2000;
  int vcpus = 2;
  int parallel = 8;  // the chunker's readahead/prefetch streams (--parallel)
  uint64_t seed = 42;
};

struct LatencyFigures {
  double p50_us = 0;
  double p99_us = 0;
};

struct UffdBenchReport {
  UffdBenchOptions options;
  double cold_limit_us = 0;
  LatencyFigures cold;
  LatencyFigures warm;
  LatencyFigures warm_baseline;
  uint64_t working_set_bytes = 0;
  double working_set_limit_ms = 0;
  double without_prefetch_ms = 0;
  double with_prefetch_ms = 0;
  uint64_t prefetched_pages = 0;
};

Result<UffdBenchReport> run_uffd_bench(const UffdBenchOptions& options);
std::string format_uffd_report(const UffdBenchReport& report);
nlohmann::json uffd_report_json(const UffdBenchReport& report);

}  // namespace lazyblock
