// `lazyblock bench seq`: a cold whole-object read (write_to) through a
// simulated store, in MB/s (10^6 bytes), beside its limit: the chunks kept in
// flight times the per-stream bandwidth (--compressed: times the ratio, or
// the cores' rate of decoding frames into a file, whichever is lower). The output is checked byte for byte
// in a second, untimed pass.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "chunk/chunker.h"
#include "chunk/frame_codec.h"
#include "common/status.h"
#include "storage/simulate_store.h"

namespace lazyblock {

struct SeqBenchOptions {
  std::string profile_name;
  SimulateProfile profile;
  uint64_t size = 1ULL << 30;
  int parallel = 8;
  FetchStrategy strategy = FetchStrategy::kSplit;
  std::optional<FrameCodec> compressed;
};

struct SeqBenchReport {
  SeqBenchOptions options;
  double seconds = 0;
  double cpu_seconds = 0;  // the process's, user + system, over the timed pass
  double mb_per_s = 0;
  double limit_mb_per_s = 0;
  uint64_t requests = 0;
  uint64_t bytes_fetched = 0;  // from the store
  // --compressed only:
  double ratio = 0;                  // uncompressed / stored bytes
  double stream_limit_mb_per_s = 0;  // streams x bandwidth x ratio
  double decompress_mb_per_s_per_core = 0;
  int cores = 0;
  double decompress_limit_mb_per_s = 0;  // cores x one core's speed
  // What the cores delivered decoding frames and writing them into a file,
  // all at once, just before the timed pass.
  double cores_limit_mb_per_s = 0;
  // How fast the cores got new pages just before (measure_new_memory): each
  // delivered byte lands in a new page of the cache file. limit_mb_per_s is
  // the lowest of this, cores_limit_mb_per_s and stream_limit_mb_per_s.
  double new_memory_mb_per_s = 0;
};

Result<SeqBenchReport> run_seq_bench(const SeqBenchOptions& options);
std::string format_seq_report(const SeqBenchReport& report);
nlohmann::json seq_report_json(const SeqBenchReport& report);

}  // namespace lazyblock
