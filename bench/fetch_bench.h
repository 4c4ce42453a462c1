// `lazyblock bench fetch`: cold-read latency of the fetch strategies, as
// E2B's BenchmarkRandomAccess measures it.
//
// One object (4 MiB of pattern data) in a file store behind the simulate
// layer, or a real store's object (see FetchBenchOptions::store); per iteration a fresh cold chunker, and `callers` threads released
// together, each reading one `block` at an offset taken from a sequence drawn
// once from `seed`, so every strategy sees the same offsets. Each read's bytes
// are checked. After the callers return, the iteration waits for the chunk to
// finish arriving (untimed) so that upstream traffic is counted whole.
//
// Beside each measured figure the report gives the strategy's model latency
// (full: TTFB + chunk/BW; streaming: TTFB + (offset in chunk + block)/BW,
// averaged over the offsets drawn) and the physical limit, TTFB + block/BW.
//
// --compressed zstd|lz4 (simulated store only): the object is 4 MiB of a
// memory-like image stored as 2 MiB compressed frames (bench/compressed_object.h),
// read through the frame chunker, whose unit of fetching is the frame: one
// row, "frame", whose model and limit are the frame's, TTFB + compressed
// frame size / BW + the frame's decompression time on one core (measured).
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "chunk/chunker.h"
#include "chunk/frame_codec.h"
#include "common/status.h"
#include "storage/object_store.h"
#include "storage/simulate_store.h"

namespace lazyblock {

struct FetchBenchOptions {
  std::string profile_name;  // as typed: "gcs", "nfs", "ttfb=5ms,bw=1GB/s"; "measured" for a store
  SimulateProfile profile;   // for a real store: measured by run_fetch_bench
  // A real store instead of the simulated one: the reads fall in the first
  // 4 MiB of `key` (or all of it, if smaller), checked against a copy read
  // before the run; the link's TTFB and bandwidth are measured by a few
  // whole-chunk reads first.
  std::shared_ptr<ObjectStore> store;
  std::string key;
  std::vector<FetchStrategy> strategies;
  int iterations = 100;
  int callers = 3;
  uint64_t block = 4096;
  uint64_t seed = 42;
  uint64_t object_size = 4 * 1024 * 1024;
  std::optional<FrameCodec> compressed;
};

struct StrategyResult {
  std::string name;  // the strategy's, or "frame" for a compressed object
  FetchStrategy strategy;
  double model_us = 0;
  double avg_us = 0;
  double p50_us = 0;
  double p99_us = 0;
  double worst_us = 0;
  double requests_per_iter = 0;
  double bytes_per_iter = 0;
};

struct FetchBenchReport {
  FetchBenchOptions options;
  double limit_us = 0;
  std::vector<StrategyResult> results;
  // --compressed only:
  uint64_t stored_bytes = 0;  // the compressed object's size
  double ratio = 0;
  double decompress_mb_per_s_per_core = 0;
};

// Runs the benchmark; `progress` (may be empty) hears of each strategy as it
// starts. Fails if a read fails or returns wrong bytes.
Result<FetchBenchReport> run_fetch_bench(const FetchBenchOptions& options,
                                         const std::function<void(std::string_view)>& progress);

// The human table, with E2B's published figures beside ours for the profiles
// it measured.
std::string format_fetch_report(const FetchBenchReport& report);

// The JSON document of DESIGN.md.
nlohmann::json fetch_report_json(const FetchBenchReport& report);

}  // namespace lazyblock
