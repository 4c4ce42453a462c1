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
constexpr int kSamplesPerThread = 20000;
const std::string kKey = "bench/hit";
// The disk: as large as the object, from kBuilds builds' data files in
// pieces of kPiece taken in turn, every kZeroEvery-th piece zeros.
constexpr int kBuilds = 4;
constexpr uint64_t kPiece = 256 * 1024;
constexpr uint64_t kZeroEvery = 16;
const std::string kDeviceName = "memfile";

// Times `kSamplesPerThread` samples of `kCallsPerSample` calls of `call` in
// each of `threads` threads; returns per-call nanoseconds, one per sample.
template <typename Call>
Result<std::vector<double>> time_calls(int threads, Call call) {
  std::vector<std::vector<double>> per_thread(threads);
  std::vector<Status> statuses(threads);
  std::barrier start(threads);
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      std::mt19937_64 rng(t + 1);
      std::vector<uint64_t> offsets(kCallsPerSample);
      per_thread[t].reserve(kSamplesPerThread);
      start.arrive_and_wait();
      for (int s = 0; s < kSamplesPerThread; ++s) {
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
  std::vector<double> all;
  for (const std::vector<double>& samples : per_thread) {
    all.insert(all.end(), samples.begin(), samples.end());
  }
  std::sort(all.begin(), all.end());
  return all;
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

  HitBenchReport report;
  for (int threads : {1, 2}) {
    // slice: a view; touch its first byte so that the call is not optimised
    // into nothing and the page is really mapped.
    std::atomic<uint64_t> sink{0};
    Result<std::vector<double>> slice_ns = time_calls(threads, [&](uint64_t offset) {
      Result<std::span<const std::byte>> view = c.slice(offset, kBlock);
      if (!view) return view.status();
      sink.fetch_add(static_cast<uint64_t>((*view)[0]), std::memory_order_relaxed);
      return Status::ok();
    });
    if (!slice_ns) return slice_ns.status();
    report.results.push_back(
        {"slice", threads, percentile(*slice_ns, 0.5), percentile(*slice_ns, 0.99)});

    Result<std::vector<double>> read_ns = time_calls(threads, [&](uint64_t offset) {
      thread_local std::vector<std::byte> buffer(kBlock);
      Result<size_t> got = c.read_at(buffer, offset);
      if (!got) return got.status();
      return Status::ok();
    });
    if (!read_ns) return read_ns.status();
    report.results.push_back(
        {"read_at", threads, percentile(*read_ns, 0.5), percentile(*read_ns, 0.99)});
  }
  if (c.stats().requests != warm_requests) {
    return Status::io_error("bench hit: a cached read went to the store");
  }

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
  for (int threads : {1, 2}) {
    std::atomic<uint64_t> sink{0};
    Result<std::vector<double>> view_ns = time_calls(threads, [&](uint64_t offset) {
      std::optional<std::span<const std::byte>> view = disk.cached_view(offset, kBlock);
      if (!view) return Status::io_error("bench hit: a warm block is not cached");
      sink.fetch_add(static_cast<uint64_t>((*view)[0]), std::memory_order_relaxed);
      return Status::ok();
    });
    if (!view_ns) return view_ns.status();
    report.disk.push_back(
        {"cached_view", threads, percentile(*view_ns, 0.5), percentile(*view_ns, 0.99)});

    Result<std::vector<double>> read_ns = time_calls(threads, [&](uint64_t offset) {
      thread_local std::vector<std::byte> buffer(kBlock);
      Result<size_t> got = disk.read(buffer, offset);
      if (!got) return got.status();
      return Status::ok();
    });
    if (!read_ns) return read_ns.status();
    report.disk.push_back({"read", threads, percentile(*read_ns, 0.5), percentile(*read_ns, 0.99)});
  }
  if (total_requests(*data_files) != disk_requests) {
    return Status::io_error("bench hit: a cached disk read went to the store");
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
