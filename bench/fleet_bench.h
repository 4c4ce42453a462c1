// `lazyblock bench fleet`: a host's VMs starting at once from one template,
// as the daemon serves them. One template (a build's disk and its memfile,
// each a Device with one set of chunkers and block caches, as the daemon's
// TemplateRegistry holds them) behind a simulated store; each VM reads the
// same recorded working set of disk blocks (4 KiB spread over the disk) in
// an order of its own, from a few threads at once (its queue depth),
// through the shared disk Device, and at the same time faults the same
// recorded working set of memory pages (4 KiB spread over the memfile) in
// an order of its own from as many vCPU threads: its guest memory is a
// Firecracker stand-in's, served over the real UFFD path (socket handshake,
// userfaultfd, UFFDIO_COPY) by a UffdServer of its own over the shared
// memfile Device, all servers' waiting faults on one worker pool, as the
// daemon's memory devices are.
//
// Three runs: one VM alone on a cold template (the figure a VM has without
// sharing), then wave 1, N VMs at once on another cold template, then wave
// 2, N more VMs once wave 1 has finished, on wave 1's (now warm) template.
// Each prints, for disk reads and for memory faults apart, the p50/p99
// latency and the bytes fetched from the store, beside the physical limit
// of a cold read (TTFB + 4 KiB / BW) and one VM's figures, and whether the
// goals of sharing are met (wave 1 fetches at most 1.05x one VM's bytes at
// a p50 at most 1.2x one VM's; wave 2 is served from the cache). Every read
// and every page is checked against its pattern.
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

// One kind of access of a run: disk reads or memory faults.
struct FleetAccesses {
  uint64_t count = 0;
  double p50_us = 0;
  double p99_us = 0;
  uint64_t upstream_bytes = 0;  // fetched from the store for this device during the run
  uint64_t upstream_requests = 0;
};

struct FleetWave {
  int vms = 0;
  double seconds = 0;      // from the first VM's start to the last one's end
  double cpu_seconds = 0;  // the process's, user + system, over those seconds
  FleetAccesses disk;
  FleetAccesses memory;
};

struct FleetBenchReport {
  FleetBenchOptions options;
  double limit_us = 0;  // TTFB + 4 KiB / BW
  int cores = 0;        // this machine's
  FleetWave single, wave1, wave2;
};

Result<FleetBenchReport> run_fleet_bench(const FleetBenchOptions& options);
std::string format_fleet_report(const FleetBenchReport& report);
nlohmann::json fleet_report_json(const FleetBenchReport& report);

}  // namespace lazyblock
