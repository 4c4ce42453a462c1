#include "bench/fetch_bench.h"

#include "bench/bench_util.h"

#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <optional>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "bench/compressed_object.h"
#include "chunk/frame_chunker.h"
#include "common/units.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

constexpr uint64_t kChunkSize = 4 * 1024 * 1024;
constexpr uint64_t kPatternSeed = 42;
const std::string kKey = "bench/object";

// E2B's published figures for its Go chunkers (avg and worst, ms), from the
// benchmark this one reproduces.
struct SeedFigures {
  std::string_view profile;
  FetchStrategy strategy;
  double avg_ms;
  double worst_ms;
};
constexpr SeedFigures kSeedFigures[] = {
    {"gcs", FetchStrategy::kStreaming, 42.8, 63.3},
    {"gcs", FetchStrategy::kFull, 66.3, 68.3},
    {"nfs", FetchStrategy::kStreaming, 6.0, 10.4},
    {"nfs", FetchStrategy::kFull, 13.8, 15.5},
};

double seconds_to_us(double seconds) { return seconds * 1e6; }

double model_seconds(const FetchBenchOptions& o, FetchStrategy strategy, uint64_t offset) {
  const double ttfb = std::chrono::duration<double>(o.profile.ttfb).count();
  const double bw = o.profile.bytes_per_second;
  const uint64_t chunk_start = align_down(offset, kChunkSize);
  const uint64_t chunk_end = std::min(o.object_size, chunk_start + kChunkSize);
  const uint64_t end = std::min(offset + o.block, o.object_size);
  switch (strategy) {
    case FetchStrategy::kFull:
      return ttfb + static_cast<double>(chunk_end - chunk_start) / bw;
    case FetchStrategy::kStreaming:
      return ttfb + static_cast<double>(end - chunk_start) / bw;
    case FetchStrategy::kSplit:
      return ttfb + static_cast<double>(end - offset) / bw;
  }
  return 0;
}

// Where the benchmark reads: a store, a key, the object's size, and how to
// tell the right bytes from wrong ones.
struct Workload {
  std::shared_ptr<ObjectStore> store;
  std::string key;
  uint64_t object_size = 0;
  std::function<bool(uint64_t offset, std::span<const std::byte> bytes)> bytes_are_right;
  std::optional<CompressedObject> compressed;  // read through a frame chunker
};

// The frame model: TTFB + the frame's stored bytes / BW + its decompression.
double frame_seconds(const FetchBenchOptions& o, const CompressedObject& object, uint64_t offset) {
  const size_t index = *object.geometry.frame_at(offset);
  return std::chrono::duration<double>(o.profile.ttfb).count() +
         static_cast<double>(object.geometry.frames[index].stored_size) /
             o.profile.bytes_per_second +
         object.decompress_seconds(index);
}

// Runs every iteration of one strategy; fills the latencies (seconds).
Status run_strategy(const FetchBenchOptions& o, FetchStrategy strategy, const Workload& workload,
                    const std::filesystem::path& cache_dir, const std::vector<uint64_t>& offsets,
                    std::vector<double>* latencies, ChunkerStats* traffic) {
  ChunkerOptions chunker_options;
  chunker_options.strategy = strategy;
  chunker_options.block_size = 4096;
  chunker_options.chunk_size = kChunkSize;
  chunker_options.cache_dir = cache_dir;
  chunker_options.expected_ttfb = o.profile.ttfb;
  chunker_options.expected_bandwidth = o.profile.bytes_per_second;
  for (int iteration = 0; iteration < o.iterations; ++iteration) {
    Result<std::unique_ptr<Chunker>> chunker =
        workload.compressed
            ? make_frame_chunker(workload.store, workload.key, workload.compressed->geometry,
                                 chunker_options)
            : make_chunker(workload.store, workload.key, workload.object_size, chunker_options);
    if (!chunker) return chunker.status();
    std::barrier start(o.callers);
    std::vector<double> iteration_latencies(o.callers);
    std::vector<Status> statuses(o.callers);
    std::vector<std::thread> callers;
    for (int caller = 0; caller < o.callers; ++caller) {
      callers.emplace_back([&, caller] {
        const uint64_t offset = offsets[iteration * o.callers + caller];
        std::vector<std::byte> buffer(o.block);
        start.arrive_and_wait();
        const auto begin = Clock::now();
        Result<size_t> got = (*chunker)->read_at(buffer, offset);
        const auto end = Clock::now();
        iteration_latencies[caller] = std::chrono::duration<double>(end - begin).count();
        if (!got) {
          statuses[caller] = got.status();
        } else if (!workload.bytes_are_right(offset, std::span(buffer).first(*got))) {
          statuses[caller] = Status::corruption(fmt::format("wrong bytes read at {}", offset));
        }
      });
    }
    for (std::thread& t : callers) t.join();
    for (const Status& status : statuses) LB_RETURN_IF_ERROR(status);
    latencies->insert(latencies->end(), iteration_latencies.begin(), iteration_latencies.end());
    // Untimed: let the chunk finish arriving, so its traffic is counted whole
    // and the next iteration starts on a quiet machine.
    Result<std::span<const std::byte>> whole = (*chunker)->slice(0, o.object_size);
    if (!whole) return whole.status();
    const ChunkerStats stats = (*chunker)->stats();
    traffic->requests += stats.requests;
    traffic->bytes += stats.bytes;
  }
  return Status::ok();
}

// The link to a real store, measured: the median time to first byte and
// bandwidth of a few reads of the first `length` bytes of `key`, which are
// left in `copy`.
Result<SimulateProfile> measure_link(ObjectStore& store, const std::string& key, uint64_t length,
                                     std::vector<std::byte>* copy) {
  constexpr int kProbes = 3;
  std::vector<double> ttfbs, bandwidths;
  copy->resize(length);
  for (int probe = 0; probe < kProbes; ++probe) {
    const IoContext io{Clock::now() + std::chrono::seconds(60), {}};
    const auto opened_at = Clock::now();
    Result<std::unique_ptr<RangeReader>> reader = store.open_range(key, 0, length, io);
    if (!reader) return reader.status().with_context("measuring the link");
    const auto first_byte_at = Clock::now();  // a response's headers come with its first byte
    uint64_t done = 0;
    while (done < length) {
      Result<size_t> got = (*reader)->read(std::span(*copy).subspan(done));
      if (!got) return got.status().with_context("measuring the link");
      if (*got == 0) {
        return Status::corruption(
            fmt::format("measuring the link: {} ended after {} of {} bytes", key, done, length));
      }
      done += *got;
    }
    const auto done_at = Clock::now();
    ttfbs.push_back(std::chrono::duration<double>(first_byte_at - opened_at).count());
    bandwidths.push_back(
        static_cast<double>(length) /
        std::max(1e-9, std::chrono::duration<double>(done_at - first_byte_at).count()));
  }
  std::sort(ttfbs.begin(), ttfbs.end());
  std::sort(bandwidths.begin(), bandwidths.end());
  return SimulateProfile{std::chrono::duration_cast<std::chrono::nanoseconds>(
                             std::chrono::duration<double>(ttfbs[kProbes / 2])),
                         bandwidths[kProbes / 2]};
}

Result<FetchBenchReport> run_measured(const FetchBenchOptions& options, const Workload& workload,
                                      const std::filesystem::path& cache_dir,
                                      const std::function<void(std::string_view)>& progress) {
  // One offset per caller per iteration, block-aligned, the same for every
  // strategy.
  std::mt19937_64 rng(options.seed);
  std::uniform_int_distribution<uint64_t> block_index(0, options.object_size / options.block - 1);
  std::vector<uint64_t> offsets(static_cast<size_t>(options.iterations) * options.callers);
  for (uint64_t& offset : offsets) offset = block_index(rng) * options.block;

  FetchBenchReport report;
  report.options = options;
  report.limit_us =
      seconds_to_us(std::chrono::duration<double>(options.profile.ttfb).count() +
                    static_cast<double>(options.block) / options.profile.bytes_per_second);
  std::vector<FetchStrategy> strategies = options.strategies;
  if (workload.compressed) {
    // Frames are fetched whole whatever the strategy: one row.
    strategies = {options.strategies.front()};
    double limit = 0;
    for (uint64_t offset : offsets) limit += frame_seconds(options, *workload.compressed, offset);
    report.limit_us = seconds_to_us(limit / static_cast<double>(offsets.size()));
    report.stored_bytes = workload.compressed->stored_bytes;
    report.ratio = workload.compressed->ratio();
    report.decompress_mb_per_s_per_core = workload.compressed->decompress_bytes_per_second / 1e6;
  }
  for (FetchStrategy strategy : strategies) {
    if (progress) progress(workload.compressed ? "frame" : fetch_strategy_name(strategy));
    std::vector<double> latencies;
    ChunkerStats traffic;
    LB_RETURN_IF_ERROR(
        run_strategy(options, strategy, workload, cache_dir, offsets, &latencies, &traffic));
    std::sort(latencies.begin(), latencies.end());
    StrategyResult result;
    result.name = workload.compressed ? "frame" : std::string(fetch_strategy_name(strategy));
    result.strategy = strategy;
    double model = 0;
    for (uint64_t offset : offsets) {
      model += workload.compressed ? frame_seconds(options, *workload.compressed, offset)
                                   : model_seconds(options, strategy, offset);
    }
    result.model_us = seconds_to_us(model / static_cast<double>(offsets.size()));
    result.avg_us = seconds_to_us(std::accumulate(latencies.begin(), latencies.end(), 0.0) /
                                  static_cast<double>(latencies.size()));
    result.p50_us = seconds_to_us(percentile(latencies, 0.50));
    result.p99_us = seconds_to_us(percentile(latencies, 0.99));
    result.worst_us = seconds_to_us(latencies.back());
    result.requests_per_iter = static_cast<double>(traffic.requests) / options.iterations;
    result.bytes_per_iter = static_cast<double>(traffic.bytes) / options.iterations;
    report.results.push_back(result);
  }
  return report;
}

}  // namespace

Result<FetchBenchReport> run_fetch_bench(const FetchBenchOptions& options,
                                         const std::function<void(std::string_view)>& progress) {
  if (options.iterations < 1 || options.callers < 1 || options.block == 0 ||
      (!options.store && options.block > options.object_size) || options.strategies.empty()) {
    return Status::invalid_argument(
        "bench fetch needs at least one strategy, iteration and caller, and a block no larger "
        "than the object");
  }
  // Sleep with nanosecond precision rather than the default 50 µs slack: the
  // simulated store's pacing is part of what is measured. Threads started from
  // here inherit it.
  ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);

  Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
  if (!scratch) return scratch.status();
  FetchBenchOptions measured = options;
  Workload workload;
  std::vector<std::byte> copy;  // of a real store's sampled bytes
  if (options.store && options.compressed) {
    return Status::invalid_argument("bench fetch --compressed reads a simulated store (--profile)");
  }
  if (options.compressed) {
    Result<CompressedObject> object = write_compressed_object(
        scratch->path() / "store" / kKey, options.object_size, *options.compressed, kPatternSeed);
    if (!object) return object.status();
    Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch->path() / "store");
    if (!files) return files.status();
    copy.resize(options.object_size);
    fill_memory_image(options.object_size, kPatternSeed, 0, copy);
    workload = {std::make_shared<SimulateStore>(*files, options.profile), kKey, options.object_size,
                [&copy](uint64_t offset, std::span<const std::byte> bytes) {
                  return std::equal(bytes.begin(), bytes.end(),
                                    copy.begin() + static_cast<ptrdiff_t>(offset));
                },
                std::move(object).value()};
  } else if (options.store) {
    Result<uint64_t> size = options.store->stat(options.key, IoContext{});
    if (!size) return size.status();
    if (*size < options.block) {
      return Status::invalid_argument(fmt::format("{} has {} bytes, less than one {}-byte read",
                                                  options.key, *size, options.block));
    }
    measured.object_size = std::min(*size, kChunkSize);
    Result<SimulateProfile> link =
        measure_link(*options.store, options.key, measured.object_size, &copy);
    if (!link) return link.status();
    measured.profile = *link;
    measured.profile_name = "measured";
    workload = {options.store, options.key, *size,
                [&copy](uint64_t offset, std::span<const std::byte> bytes) {
                  return std::equal(bytes.begin(), bytes.end(),
                                    copy.begin() + static_cast<ptrdiff_t>(offset));
                },
                std::nullopt};
  } else {
    std::filesystem::create_directories(scratch->path() / "store");
    Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch->path() / "store");
    if (!files) return files.status();
    LB_RETURN_IF_ERROR((*files)->put(
        kKey, testing::make_pattern(kPatternSeed, 0, options.object_size), IoContext{}));
    workload = {std::make_shared<SimulateStore>(*files, options.profile), kKey, options.object_size,
                [](uint64_t offset, std::span<const std::byte> bytes) {
                  return testing::first_pattern_mismatch(kPatternSeed, offset, bytes) ==
                         bytes.size();
                },
                std::nullopt};
  }
  return run_measured(measured, workload, scratch->path(), progress);
}

std::string format_fetch_report(const FetchBenchReport& report) {
  const FetchBenchOptions& o = report.options;
  std::string out = fmt::format(
      "bench fetch: profile {} ({}), {} object, {} callers x {} iterations, {}-byte reads, "
      "seed {}\n",
      o.profile_name, o.profile.to_string(), format_size(o.object_size), o.callers, o.iterations,
      o.block, o.seed);
  if (!o.compressed) {
    out += fmt::format("physical limit (TTFB + block/BW): {:.2f} ms\n\n", report.limit_us / 1000);
  }
  if (o.store) {
    out = fmt::format("store {}, key {} (reads in its first {})\n", o.store->describe(), o.key,
                      format_size(o.object_size)) +
          out;
  }
  if (o.compressed) {
    out += fmt::format(
        "a memory-like image stored as {} frames of 2 MiB: {} in {} ({:.2f}x), {:.0f} MB/s of "
        "decompression per core\n"
        "frame limit (TTFB + compressed frame/BW + decompression), averaged over the reads: "
        "{:.2f} ms\n\n",
        frame_codec_name(*o.compressed), format_size(o.object_size),
        format_size(report.stored_bytes), report.ratio, report.decompress_mb_per_s_per_core,
        report.limit_us / 1000);
  }
  out += fmt::format("{:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>9}   {}\n", "strategy",
                     "model ms", "avg ms", "p50 ms", "p99 ms", "worst ms", "avg/model", "req/it",
                     "MiB/it", "E2B seed avg / worst ms");
  for (const StrategyResult& r : report.results) {
    std::string seed = "-";
    for (const SeedFigures& figures : kSeedFigures) {
      if (!o.compressed && figures.profile == o.profile_name && figures.strategy == r.strategy) {
        seed = fmt::format("{:.1f} / {:.1f}", figures.avg_ms, figures.worst_ms);
      }
    }
    out += fmt::format(
        "{:<10} {:>9.2f} {:>9.2f} {:>9.2f} {:>9.2f} {:>9.2f} {:>10.3f} {:>8.1f} "
        "{:>9.2f}   {}\n",
        r.name, r.model_us / 1000, r.avg_us / 1000, r.p50_us / 1000, r.p99_us / 1000,
        r.worst_us / 1000, r.avg_us / r.model_us, r.requests_per_iter, r.bytes_per_iter / kMiB,
        seed);
  }
  return out;
}

nlohmann::json fetch_report_json(const FetchBenchReport& report) {
  nlohmann::json results = nlohmann::json::array();
  for (const StrategyResult& r : report.results) {
    results.push_back({{"strategy", r.name},
                       {"model_us", r.model_us},
                       {"avg_us", r.avg_us},
                       {"p50_us", r.p50_us},
                       {"p99_us", r.p99_us},
                       {"worst_us", r.worst_us},
                       {"requests_per_iter", r.requests_per_iter},
                       {"bytes_per_iter", r.bytes_per_iter}});
  }
  nlohmann::json document = {{"profile", report.options.profile_name},
                             {"limit_us", report.limit_us},
                             {"results", std::move(results)}};
  if (report.options.compressed) {
    document["compressed"] = frame_codec_name(*report.options.compressed);
    document["stored_bytes"] = report.stored_bytes;
    document["ratio"] = report.ratio;
    document["decompress_mb_per_s_per_core"] = report.decompress_mb_per_s_per_core;
  }
  if (report.options.store) {
    document["store"] = report.options.store->describe();
    document["key"] = report.options.key;
    document["ttfb_us"] =
        seconds_to_us(std::chrono::duration<double>(report.options.profile.ttfb).count());
    document["mb_per_s"] = report.options.profile.bytes_per_second / 1e6;
  }
  return document;
}

}  // namespace lazyblock
