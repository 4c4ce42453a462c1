#include "bench/fleet_bench.h"

#include <fcntl.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "bench/bench_util.h"
#include "common/unique_fd.h"
#include "common/units.h"
#include "image/device.h"
#include "storage/file_store.h"
#include "testing/build_fixture.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

constexpr uint64_t kBlock = 4096;
constexpr uint64_t kPatternSeed = 15;
const char* const kBuild = "f1ee7f1e-e7f1-4ee7-9f1e-e7f1ee7f1ee7";
const char* const kName = "rootfs.ext4";

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

class Fleet {
 public:
  explicit Fleet(const FleetBenchOptions& options) : o_(options) {}

  Status set_up() {
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);  // as in bench fetch: precise pacing
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    if (!scratch) return scratch.status();
    scratch_ = std::move(scratch).value();
    testing::BuildSpec spec(dir() / "store", kBuild, kName);
    Result<testing::PackedBuild> packed =
        testing::pack_build(spec, disk_size(), [](uint64_t offset, std::span<std::byte> out) {
          testing::fill_pattern(kPatternSeed, offset, out);
        });
    if (!packed) return packed.status();
    files_ = packed->store;
    build_ = packed->build;
    // The recorded working set: blocks spread over the whole disk.
    std::vector<uint64_t> all(disk_size() / kBlock);
    for (uint64_t i = 0; i < all.size(); ++i) all[i] = i * kBlock;
    std::mt19937_64 rng(o_.seed);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(std::min<uint64_t>(all.size(), o_.working_set / kBlock));
    working_set_ = std::move(all);
    return Status::ok();
  }

  // A template as the daemon loads one: a Device with data files (chunkers,
  // block caches) of its own, sizes learned, behind the simulated store.
  struct Template {
    std::shared_ptr<image::DataFiles> files;
    std::unique_ptr<image::Device> device;
  };
  Result<Template> cold_template() {
    auto simulated = std::make_shared<SimulateStore>(files_, o_.profile);
    Template made{std::make_shared<image::DataFiles>(simulated, chunker_options()), nullptr};
    Result<std::unique_ptr<image::Device>> device = image::Device::open(made.files, build_, kName);
    if (!device) return device.status();
    LB_RETURN_IF_ERROR((*device)->learn_sizes());
    made.device = std::move(device).value();
    return made;
  }

  // `vms` VMs at once reading the working set through `shared`'s device.
  Result<FleetWave> wave(Template& shared, int vms, uint64_t first_seed) {
    image::Device& device = *shared.device;
    const ChunkerStats before = upstream(*shared.files);
    std::vector<std::vector<double>> latencies(static_cast<size_t>(vms) * o_.queue_depth);
    std::vector<Status> failures(latencies.size(), Status::ok());
    const auto start = Clock::now();
    std::vector<std::thread> threads;
    for (int vm = 0; vm < vms; ++vm) {
      // This VM's order of the working set, dealt to its queue.
      auto order = std::make_shared<std::vector<uint64_t>>(working_set_);
      std::mt19937_64 rng(first_seed + static_cast<uint64_t>(vm));
      std::shuffle(order->begin(), order->end(), rng);
      auto next = std::make_shared<std::atomic<size_t>>(0);
      for (int q = 0; q < o_.queue_depth; ++q) {
        const size_t slot = static_cast<size_t>(vm) * o_.queue_depth + q;
        threads.emplace_back([&, order, next, slot] {
          std::vector<std::byte> buffer(kBlock);
          std::vector<double>& mine = latencies[slot];
          for (size_t i; (i = next->fetch_add(1)) < order->size();) {
            const uint64_t offset = (*order)[i];
            const auto asked = Clock::now();
            Result<size_t> got = device.read(buffer, offset);
            mine.push_back(seconds_since(asked));
            if (!got || *got != kBlock ||
                testing::first_pattern_mismatch(kPatternSeed, offset, buffer) != kBlock) {
              failures[slot] = got ? Status::corruption(fmt::format(
                                         "bench fleet: wrong bytes at offset {}", offset))
                                   : got.status();
              return;
            }
          }
        });
      }
    }
    for (std::thread& thread : threads) thread.join();
    for (const Status& failure : failures) LB_RETURN_IF_ERROR(failure);
    FleetWave result;
    result.vms = vms;
    result.seconds = seconds_since(start);
    std::vector<double> all;
    for (const std::vector<double>& one : latencies) all.insert(all.end(), one.begin(), one.end());
    std::sort(all.begin(), all.end());
    result.reads = all.size();
    result.p50_us = percentile(all, 0.5) * 1e6;
    result.p99_us = percentile(all, 0.99) * 1e6;
    // Streams the wave started and still running (read ahead past its
    // last read) are the wave's too.
    while (upstream(*shared.files).streams > 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    const ChunkerStats after = upstream(*shared.files);
    result.upstream_bytes = after.bytes - before.bytes;
    result.upstream_requests = after.requests - before.requests;
    return result;
  }

 private:
  uint64_t disk_size() const {
    const uint64_t size = o_.disk_size > 0 ? o_.disk_size : 4 * o_.working_set;
    return std::max(kBlock, size / kBlock * kBlock);
  }
  std::filesystem::path dir() const { return scratch_->path(); }

  ChunkerOptions chunker_options() const {
    ChunkerOptions options;
    options.strategy = o_.strategy;
    options.cache_dir = dir();
    options.expected_ttfb = o_.profile.ttfb;
    options.expected_bandwidth = o_.profile.bytes_per_second;
    return options;
  }

  static ChunkerStats upstream(const image::DataFiles& files) {
    ChunkerStats total;
    for (const auto& [build, stats] : files.stats()) {
      total.requests += stats.requests;
      total.bytes += stats.bytes;
      total.streams += stats.streams;
    }
    return total;
  }

  const FleetBenchOptions o_;
  std::optional<testing::ScratchDir> scratch_;
  std::shared_ptr<FileStore> files_;
  image::Uuid build_;
  std::vector<uint64_t> working_set_;
};

}  // namespace

Result<FleetBenchReport> run_fleet_bench(const FleetBenchOptions& options) {
  if (options.vms < 1 || options.queue_depth < 1 || options.working_set < kBlock) {
    return Status::invalid_argument(
        "bench fleet needs --vms >= 1, --queue-depth >= 1 and a working set of 4 KiB or more");
  }
  Fleet fleet(options);
  LB_RETURN_IF_ERROR(fleet.set_up());
  FleetBenchReport report;
  report.options = options;
  report.limit_us = (std::chrono::duration<double>(options.profile.ttfb).count() +
                     static_cast<double>(kBlock) / options.profile.bytes_per_second) *
                    1e6;
  {
    Result<Fleet::Template> alone = fleet.cold_template();
    if (!alone) return alone.status();
    Result<FleetWave> single = fleet.wave(*alone, 1, options.seed * 1000);
    if (!single) return single.status();
    report.single = *single;
  }
  Result<Fleet::Template> shared = fleet.cold_template();
  if (!shared) return shared.status();
  Result<FleetWave> wave1 = fleet.wave(*shared, options.vms, options.seed * 1000 + 100);
  if (!wave1) return wave1.status();
  report.wave1 = *wave1;
  Result<FleetWave> wave2 = fleet.wave(*shared, options.vms, options.seed * 1000 + 200);
  if (!wave2) return wave2.status();
  report.wave2 = *wave2;
  return report;
}

std::string format_fleet_report(const FleetBenchReport& report) {
  const FleetBenchOptions& o = report.options;
  std::string out = fmt::format(
      "bench fleet: {} VMs of one template, profile {} ({}), each reading a working set of {} "
      "(4 KiB blocks over a {} disk) at random, {} reads in flight per VM\n"
      "{:<10} {:>4} {:>8} {:>11} {:>11} {:>14} {:>9} {:>8}\n",
      o.vms, o.profile_name, o.profile.to_string(), format_size(o.working_set),
      format_size(o.disk_size > 0 ? o.disk_size : 4 * o.working_set), o.queue_depth, "run", "VMs",
      "reads", "p50 us", "p99 us", "upstream MB", "requests", "seconds");
  const auto row = [&](const char* name, const FleetWave& w) {
    out += fmt::format("{:<10} {:>4} {:>8} {:>11.1f} {:>11.1f} {:>14.2f} {:>9} {:>8.2f}\n", name,
                       w.vms, w.reads, w.p50_us, w.p99_us,
                       static_cast<double>(w.upstream_bytes) / 1e6, w.upstream_requests, w.seconds);
  };
  row("single VM", report.single);
  row("wave 1", report.wave1);
  row("wave 2", report.wave2);
  const double single_bytes =
      static_cast<double>(std::max<uint64_t>(1, report.single.upstream_bytes));
  out += fmt::format(
      "limit: a cold read {:.0f} us (TTFB + 4 KiB/BW); wave 1 fetched {:.2f}x one VM's bytes, its "
      "p50 {:.2f}x the single VM's\n",
      report.limit_us, static_cast<double>(report.wave1.upstream_bytes) / single_bytes,
      report.single.p50_us > 0 ? report.wave1.p50_us / report.single.p50_us : 0.0);
  return out;
}

nlohmann::json fleet_report_json(const FleetBenchReport& report) {
  const auto wave = [](const FleetWave& w) {
    return nlohmann::json{{"vms", w.vms},
                          {"reads", w.reads},
                          {"p50_us", w.p50_us},
                          {"p99_us", w.p99_us},
                          {"seconds", w.seconds},
                          {"upstream_bytes", w.upstream_bytes},
                          {"upstream_requests", w.upstream_requests}};
  };
  return {{"profile", report.options.profile_name},
          {"vms", report.options.vms},
          {"working_set", report.options.working_set},
          {"limit_us", report.limit_us},
          {"single", wave(report.single)},
          {"wave1", wave(report.wave1)},
          {"wave2", wave(report.wave2)}};
}

}  // namespace lazyblock
