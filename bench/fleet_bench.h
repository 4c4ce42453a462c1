// `lazyblock bench fleet`: a host's VMs starting at once from one template,
// as the daemon serves them. One template (a build's disk, its Device with
// one set of chunkers and block caches, as the daemon's TemplateRegistry
// holds it) behind a simulated store; each VM reads the same recorded
// working set (4 KiB blocks spread over the disk) in an order of its own,
// from a few threads at once (its queue depth), through that shared Device.
//
// Three runs: one VM alone on a cold template (the figure a VM has without
// sharing), then wave 1, N VMs at once on another cold template, then wave
// 2, N more VMs once wave 1 has finished, on wave 1's (now warm) template.
// Each prints the p50/p99 latency of a read and the bytes fetched from the
// store, beside the physical limit of a cold read (TTFB + 4 KiB / BW) and
// the bytes of one VM's. Every read is checked against the pattern.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "chunk/chunker.h"
#include "common/status.h"
#include "storage/simulate_store.h"

namespace lazyblock {

struct FleetBenchOptions {
  std::string profile_name;
  SimulateProfile profile;
  int vms = 8;
  uint64_t working_set = 32ULL << 20;  // bytes each VM reads
  uint64_t disk_size = 0;              // 0: four times the working set
  int queue_depth = 4;                 // reads each VM has in flight
  FetchStrategy strategy = FetchStrategy::kSplit;
  uint64_t seed = 42;
};

struct FleetWave {
  int vms = 0;
  uint64_t reads = 0;
  double p50_us = 0;
  double p99_us = 0;
  double seconds = 0;           // from the first VM's start to the last one's end
  uint64_t upstream_bytes = 0;  // fetched from the store during the wave
  uint64_t upstream_requests = 0;
};

struct FleetBenchReport {
  FleetBenchOptions options;
  double limit_us = 0;  // TTFB + 4 KiB / BW
  FleetWave single, wave1, wave2;
};

Result<FleetBenchReport> run_fleet_bench(const FleetBenchOptions& options);
std::string format_fleet_report(const FleetBenchReport& report);
nlohmann::json fleet_report_json(const FleetBenchReport& report);

}  // namespace lazyblock
