#include "bench/hit_bench.h"

#include "bench/bench_util.h"

#include <unistd.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "chunk/chunker.h"
#include "common/units.h"
#include "image/device.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

constexpr uint64_t kObjectSize = 64 * kMiB;
constexpr uint64_t kBlock = 4096;
constexpr int kCallsPerSample = 16;
// The chunker's and the disk's calls take turns in kRounds rounds of
// kSamplesPerRound samples per thread each, so that a change of load on a
// shared machine falls on both alike and their ratio holds.
constexpr int kRounds = 4;
constexpr int kSamplesPerRound = 5000;
const std::string kKey = "bench/hit";
// The disk: as large as the object, from kBuilds builds' data files in
// pieces of kPiece taken in turn, every kZeroEvery-th piece zeros.
constexpr int kBuilds = 4;
constexpr uint64_t kPiece = 256 * 1024;
constexpr uint64_t kZeroEvery = 16;
const std::string kDeviceName = "memfile";

// Times `kSamplesPerRound` samples of `kCallsPerSample` calls of `call` in
// each of `threads` threads; appends per-call nanoseconds, one per sample,
// to `samples`.
template <typename Call>
Status time_calls(int threads, std::vector<double>& samples, Call call) {
  std::vector<std::vector<double>> per_thread(threads);
  std::vector<Status> statuses(threads);
  std::barrier start(threads);
  // Each round's offsets differ; the chunker's and the disk's are the same.
  const uint64_t round_seed = samples.size();
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 rng(round_seed + t + 1);
      std::vector<uint64_t> offsets(kCallsPerSample);
      per_thread[t].reserve(kSamplesPerRound);
      start.arrive_and_wait();
      for (int s = 0; s < kSamplesPerRound; ++s) {
        for (uint64_t& offset : offsets) offset = rng() % (kObjectSize / kBlock) * kBlock;
        const auto begin = std::chrono::steady_clock::now();
        for (uint64_t offset : offsets) {
          if (Status status = call(offset); !status.is_ok()) {
            statuses[t] = status;
            return;
          }
        }
        const auto end = std::chrono::steady_clock::now();
        per_thread[t].push_back(std::chrono::duration<double, std::nano>(end - begin).count() /
                                kCallsPerSample);
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  for (const Status& status : statuses) LB_RETURN_IF_ERROR(status);
  for (const std::vector<double>& own : per_thread)
    samples.insert(samples.end(), own.begin(), own.end());
  return Status::ok();
}

HitResult summarise(std::string name, int threads, std::vector<double>& samples) {
  std::sort(samples.begin(), samples.end());
  return {std::move(name), threads, percentile(samples, 0.5), percentile(samples, 0.99)};
}

// A device of kBuilds generations stored in `store`, its header saved
// there as pack saves one, opened as a server opens it.
Result<std::unique_ptr<image::Device>> open_layered_device(
    const std::shared_ptr<FileStore>& store, std::shared_ptr<image::DataFiles> files) {
  std::vector<image::Uuid> builds;
  for (int b = 0; b < kBuilds; ++b) {
    builds.push_back(image::Uuid::random());
    LB_RETURN_IF_ERROR(store->put(image::data_key(builds.back(), kDeviceName),
                                  testing::make_pattern(b + 2, 0, kObjectSize / kBuilds),
                                  IoContext{}));
  }
  image::Header header;
  header.block_size = kBlock;
  header.size = kObjectSize;
  header.generation = kBuilds - 1;
  header.build_id = builds.back();
  header.base_build_id = builds.front();
  for (uint64_t piece = 0; piece < kObjectSize / kPiece; ++piece) {
    const bool zero = piece % kZeroEvery == kZeroEvery - 1;
    const image::Uuid& build = builds[piece % kBuilds];
    header.mappings.push_back({piece * kPiece, kPiece, zero ? image::Uuid::nil() : build,
                               zero ? 0 : piece / kBuilds * kPiece});
  }
  Result<std::vector<std::byte>> bytes = header.serialize();
  if (!bytes) return bytes.status();
  LB_RETURN_IF_ERROR(
      store->put(image::header_key(header.build_id, kDeviceName), *bytes, IoContext{}));
  return image::Device::open(std::move(files), header.build_id, kDeviceName);
}

uint64_t total_requests(const image::DataFiles& files) {
  uint64_t requests = 0;
  for (const auto& [build, stats] : files.stats()) requests += stats.requests;
  return requests;
}

}  // namespace

Result<HitBenchReport> run_hit_bench() {
  Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
  if (!scratch) return scratch.status();
  const std::filesystem::path& dir = scratch->path();
  Result<std::shared_ptr<FileStore>> files = FileStore::open(dir);
  if (!files) return files.status();
  LB_RETURN_IF_ERROR((*files)->put(kKey, testing::make_pattern(1, 0, kObjectSize), IoContext{}));
  ChunkerOptions options;
  options.cache_dir = dir;
  Result<std::unique_ptr<Chunker>> chunker = make_chunker(*files, kKey, kObjectSize, options);
  if (!chunker) return chunker.status();
  Chunker& c = **chunker;
  // Warm: every block cached.
  Result<std::span<const std::byte>> whole = c.slice(0, kObjectSize);
  if (!whole) return whole.status();
  const uint64_t warm_requests = c.stats().requests;

  // The same reads through a Disk: a real header's extent table over
  // several builds' chunkers.
  auto data_files = std::make_shared<image::DataFiles>(*files, options);
  Result<std::unique_ptr<image::Device>> device = open_layered_device(*files, data_files);
  if (!device) return device.status();
  image::Disk& disk = **device;
  // Warm: every block fetched, and every page of the views mapped in, as
  // the chunker's are after its fetch.
  std::atomic<uint64_t> touched{0};
  for (uint64_t offset = 0; offset < kObjectSize; offset += kBlock) {
    Result<std::optional<std::span<const std::byte>>> view = disk.view(offset, kBlock);
    if (!view) return view.status();
    if (!*view) return Status::io_error("bench hit: a block of the disk has no view");
    touched.fetch_add(static_cast<uint64_t>((**view)[0]), std::memory_order_relaxed);
  }
  const uint64_t disk_requests = total_requests(*data_files);

  // Per-call nanoseconds of each call, by thread count (1, 2).
  struct Samples {
    std::vector<double> slice, read_at, cached_view, read;
  };
  Samples by_threads[2];
  // A view's first byte is touched, so that the call is not optimised into
  // nothing and the page is really mapped.
  std::atomic<uint64_t> sink{0};
  for (int round = 0; round < kRounds; ++round) {
    for (int threads : {1, 2}) {
      Samples& samples = by_threads[threads - 1];
      LB_RETURN_IF_ERROR(time_calls(threads, samples.slice, [&](uint64_t offset) {
        Result<std::span<const std::byte>> view = c.slice(offset, kBlock);
        if (!view) return view.status();
        sink.fetch_add(static_cast<uint64_t>((*view)[0]), std::memory_order_relaxed);
        return Status::ok();
      }));
      LB_RETURN_IF_ERROR(time_calls(threads, samples.cached_view, [&](uint64_t offset) {
        std::optional<std::span<const std::byte>> view = disk.cached_view(offset, kBlock);
        if (!view) return Status::io_error("bench hit: a warm block is not cached");
        sink.fetch_add(static_cast<uint64_t>((*view)[0]), std::memory_order_relaxed);
        return Status::ok();
      }));
      LB_RETURN_IF_ERROR(time_calls(threads, samples.read_at, [&](uint64_t offset) {
        thread_local std::vector<std::byte> buffer(kBlock);
        Result<size_t> got = c.read_at(buffer, offset);
        if (!got) return got.status();
        return Status::ok();
      }));
      LB_RETURN_IF_ERROR(time_calls(threads, samples.read, [&](uint64_t offset) {
        thread_local std::vector<std::byte> buffer(kBlock);
        Result<size_t> got = disk.read(buffer, offset);
        if (!got) return got.status();
        return Status::ok();
      }));
    }
  }
  if (c.stats().requests != warm_requests) {
    return Status::io_error("bench hit: a cached read went to the store");
  }
  if (total_requests(*data_files) != disk_requests) {
    return Status::io_error("bench hit: a cached disk read went to the store");
  }
  HitBenchReport report;
  for (int threads : {1, 2}) {
    Samples& samples = by_threads[threads - 1];
    report.results.push_back(summarise("slice", threads, samples.slice));
    report.results.push_back(summarise("read_at", threads, samples.read_at));
    report.disk.push_back(summarise("cached_view", threads, samples.cached_view));
    report.disk.push_back(summarise("read", threads, samples.read));
  }
  return report;
}

std::string format_hit_report(const HitBenchReport& report) {
  std::string out = fmt::format(
      "bench hit: cached {}-byte reads of a {} object ({} calls per timed sample)\n\n"
      "{:<8} {:>7} {:>10} {:>10}\n",
      kBlock, format_size(kObjectSize), kCallsPerSample, "call", "threads", "median ns", "p99 ns");
  for (const HitResult& r : report.results) {
    out +=
        fmt::format("{:<8} {:>7} {:>10.0f} {:>10.0f}\n", r.name, r.threads, r.median_ns, r.p99_ns);
  }
  out += fmt::format(
      "\ndisk: the same reads through image::Disk ({} builds in {} pieces, every {}th zeros)\n\n"
      "{:<12} {:>7} {:>10} {:>10} {:>14}\n",
      kBuilds, format_size(kPiece), kZeroEvery, "call", "threads", "median ns", "p99 ns",
      "x chunker's");
  for (const HitResult& r : report.disk) {
    // Beside the chunker's own call of the same kind and threads.
    const std::string mirror = r.name == "cached_view" ? "slice" : "read_at";
    double ratio = 0;
    for (const HitResult& c : report.results) {
      if (c.name == mirror && c.threads == r.threads && c.median_ns > 0) {
        ratio = r.median_ns / c.median_ns;
      }
    }
    out += fmt::format("{:<12} {:>7} {:>10.0f} {:>10.0f} {:>14.2f}\n", r.name, r.threads,
                       r.median_ns, r.p99_ns, ratio);
  }
  return out;
}

nlohmann::json hit_report_json(const HitBenchReport& report) {
  nlohmann::json results = nlohmann::json::array();
  for (const HitResult& r : report.results) {
    results.push_back({{"name", r.name},
                       {"threads", r.threads},
                       {"median_ns", r.median_ns},
                       {"p99_ns", r.p99_ns}});
  }
  nlohmann::json disk = nlohmann::json::array();
  for (const HitResult& r : report.disk) {
    disk.push_back({{"name", r.name},
                    {"threads", r.threads},
                    {"median_ns", r.median_ns},
                    {"p99_ns", r.p99_ns}});
  }
  return {{"results", std::move(results)}, {"disk", std::move(disk)}};
}

}  // namespace lazyblock
