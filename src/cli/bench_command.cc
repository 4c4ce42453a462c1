// lazyblock bench fetch: see bench/fetch_bench.h.
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <sstream>

#include <fmt/format.h>

#include "bench/fetch_bench.h"
#include "bench/fleet_bench.h"
#include "bench/hit_bench.h"
#include "bench/seq_bench.h"
#include "bench/uffd_bench.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "common/units.h"
#include "storage/store_url.h"

namespace lazyblock::cli {
namespace {

struct FetchBenchFlags {
  std::string profile;
  std::string store;
  std::string key;
  std::string strategies = "full,streaming,split";
  int iterations = 50;
  int callers = 3;
  std::string block = "4096";
  uint64_t seed = 42;
  std::string compressed;
  bool json = false;
  std::string log_level = "warn";
};

// --compressed zstd|lz4 of bench fetch and bench seq; nullopt without it.
Result<std::optional<FrameCodec>> parse_compressed(const std::string& name) {
  if (name.empty()) return std::optional<FrameCodec>();
  if (name == "zstd") return std::optional<FrameCodec>(FrameCodec::kZstd);
  if (name == "lz4") return std::optional<FrameCodec>(FrameCodec::kLz4);
  return Status::invalid_argument(
      fmt::format("--compressed {}: the codecs are zstd and lz4", name));
}

Result<FetchBenchOptions> fetch_bench_options(const FetchBenchFlags& flags) {
  FetchBenchOptions options;
  if (flags.profile.empty() == flags.store.empty()) {
    return Status::invalid_argument("bench fetch needs either --profile or --store (with --key)");
  }
  if (!flags.store.empty()) {
    if (flags.key.empty()) return Status::invalid_argument("bench fetch --store needs --key");
    Result<std::shared_ptr<ObjectStore>> store = open_store(flags.store);
    if (!store) return store.status();
    options.store = *store;
    options.key = flags.key;
  } else {
    Result<SimulateProfile> profile = SimulateProfile::parse(flags.profile);
    if (!profile) return profile.status();
    options.profile_name = flags.profile;
    options.profile = *profile;
  }
  std::stringstream names(flags.strategies);
  for (std::string name; std::getline(names, name, ',');) {
    Result<FetchStrategy> strategy = parse_fetch_strategy(name);
    if (!strategy) return strategy.status();
    options.strategies.push_back(*strategy);
  }
  Result<uint64_t> block = parse_size(flags.block);
  if (!block) return block.status();
  options.block = *block;
  options.iterations = flags.iterations;
  options.callers = flags.callers;
  options.seed = flags.seed;
  Result<std::optional<FrameCodec>> compressed = parse_compressed(flags.compressed);
  if (!compressed) return compressed.status();
  options.compressed = *compressed;
  return options;
}

int run_fetch_bench_command(const FetchBenchFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  Result<FetchBenchOptions> options = fetch_bench_options(flags);
  if (!options) return report_failure(options.status());
  const bool show_progress = ::isatty(STDERR_FILENO) == 1;
  Result<FetchBenchReport> report =
      run_fetch_bench(*options, [show_progress](std::string_view strategy) {
        if (show_progress) {
          std::fprintf(stderr, "bench fetch: running %.*s...\n", static_cast<int>(strategy.size()),
                       strategy.data());
        }
      });
  if (!report) return report_failure(report.status().with_context("bench fetch"));
  if (flags.json) {
    std::printf("%s\n", fetch_report_json(*report).dump(2).c_str());
  } else {
    std::printf("%s", format_fetch_report(*report).c_str());
  }
  return 0;
}

struct HitBenchFlags {
  bool json = false;
  std::string log_level = "warn";
};

int run_hit_bench_command(const HitBenchFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  Result<HitBenchReport> report = run_hit_bench();
  if (!report) return report_failure(report.status().with_context("bench hit"));
  if (flags.json) {
    std::printf("%s\n", hit_report_json(*report).dump(2).c_str());
  } else {
    std::printf("%s", format_hit_report(*report).c_str());
  }
  return 0;
}

struct SeqBenchFlags {
  std::string profile;
  std::string size = "1GiB";
  int parallel = 8;
  std::string fetch = "split";
  std::string compressed;
  bool json = false;
  std::string log_level = "warn";
};

int run_seq_bench_command(const SeqBenchFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  SeqBenchOptions options;
  Result<SimulateProfile> profile = SimulateProfile::parse(flags.profile);
  if (!profile) return report_failure(profile.status());
  options.profile_name = flags.profile;
  options.profile = *profile;
  Result<uint64_t> size = parse_size(flags.size);
  if (!size) return report_failure(size.status());
  options.size = *size;
  options.parallel = flags.parallel;
  Result<FetchStrategy> strategy = parse_fetch_strategy(flags.fetch);
  if (!strategy) return report_failure(strategy.status());
  options.strategy = *strategy;
  Result<std::optional<FrameCodec>> compressed = parse_compressed(flags.compressed);
  if (!compressed) return report_failure(compressed.status());
  options.compressed = *compressed;
  Result<SeqBenchReport> report = run_seq_bench(options);
  if (!report) return report_failure(report.status().with_context("bench seq"));
  if (flags.json) {
    std::printf("%s\n", seq_report_json(*report).dump(2).c_str());
  } else {
    std::printf("%s", format_seq_report(*report).c_str());
  }
  return 0;
}

struct FleetBenchFlags {
  std::string profile;
  int vms = 8;
  std::string working_set = "32MiB";
  std::string disk_size;
  int queue_depth = 4;
  std::string fetch = "split";
  uint64_t seed = 42;
  bool json = false;
  std::string log_level = "warn";
};

int run_fleet_bench_command(const FleetBenchFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  FleetBenchOptions options;
  Result<SimulateProfile> profile = SimulateProfile::parse(flags.profile);
  if (!profile) return report_failure(profile.status());
  options.profile_name = flags.profile;
  options.profile = *profile;
  options.vms = flags.vms;
  Result<uint64_t> working_set = parse_size(flags.working_set);
  if (!working_set) return report_failure(working_set.status().with_context("--working-set"));
  options.working_set = *working_set;
  if (!flags.disk_size.empty()) {
    Result<uint64_t> disk_size = parse_size(flags.disk_size);
    if (!disk_size) return report_failure(disk_size.status().with_context("--disk-size"));
    options.disk_size = *disk_size;
  }
  options.queue_depth = flags.queue_depth;
  Result<FetchStrategy> strategy = parse_fetch_strategy(flags.fetch);
  if (!strategy) return report_failure(strategy.status());
  options.strategy = *strategy;
  options.seed = flags.seed;
  Result<FleetBenchReport> report = run_fleet_bench(options);
  if (!report) return report_failure(report.status().with_context("bench fleet"));
  if (flags.json) {
    std::printf("%s\n", fleet_report_json(*report).dump(2).c_str());
  } else {
    std::printf("%s", format_fleet_report(*report).c_str());
  }
  return 0;
}

struct UffdBenchFlags {
  std::string profile;
  std::string memfile_size = "256MiB";
  std::string working_set = "32MiB";
  int vcpus = 2;
  int parallel = 8;
  bool json = false;
  std::string log_level = "warn";
};

int run_uffd_bench_command(const UffdBenchFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  UffdBenchOptions options;
  Result<SimulateProfile> profile = SimulateProfile::parse(flags.profile);
  if (!profile) return report_failure(profile.status());
  options.profile_name = flags.profile;
  options.profile = *profile;
  Result<uint64_t> memfile_size = parse_size(flags.memfile_size);
  if (!memfile_size) return report_failure(memfile_size.status().with_context("--memfile-size"));
  options.memfile_size = *memfile_size;
  Result<uint64_t> working_set = parse_size(flags.working_set);
  if (!working_set) return report_failure(working_set.status().with_context("--working-set"));
  options.working_set = *working_set;
  options.vcpus = flags.vcpus;
  options.parallel = flags.parallel;
  Result<UffdBenchReport> report = run_uffd_bench(options);
  if (!report) return report_failure(report.status().with_context("bench uffd"));
  if (flags.json) {
    std::printf("%s\n", uffd_report_json(*report).dump(2).c_str());
  } else {
    std::printf("%s", format_uffd_report(*report).c_str());
  }
  return 0;
}

}  // namespace

CommandRunner add_bench_command(CLI::App& app) {
  CLI::App* bench = app.add_subcommand("bench", "Measure lazyblock against its physical limits");
  bench->require_subcommand(1);

  auto fetch_flags = std::make_shared<FetchBenchFlags>();
  CLI::App* fetch = bench->add_subcommand(
      "fetch",
      "Cold-read latency of the fetch strategies: concurrent callers each read one block of a "
      "4 MiB object behind a simulated (or a real) store, a fresh cold cache per iteration");
  fetch->add_option("--profile", fetch_flags->profile,
                    "Simulated store: gcs (20ms, 100MB/s), nfs (1ms, 500MB/s) or ttfb=MS,bw=MBPS");
  fetch->add_option("--store", fetch_flags->store,
                    "A real store instead (file://, http(s)://, s3://, gs://): reads fall in the "
                    "first 4 MiB of --key; its link is measured first");
  fetch->add_option("--key", fetch_flags->key, "The object to read, with --store");
  fetch->add_option("--strategy", fetch_flags->strategies, "Comma-separated strategies")
      ->capture_default_str();
  fetch->add_option("--iterations", fetch_flags->iterations, "Cold chunkers per strategy")
      ->capture_default_str()
      ->check(at_least(1));
  fetch->add_option("--callers", fetch_flags->callers, "Concurrent readers per iteration")
      ->capture_default_str()
      ->check(at_least(1));
  fetch->add_option("--block", fetch_flags->block, "Bytes each caller reads")
      ->capture_default_str();
  fetch->add_option("--seed", fetch_flags->seed, "Seed of the offset sequence")
      ->capture_default_str();
  fetch->add_option("--compressed", fetch_flags->compressed,
                    "zstd or lz4: the object is a memory-like image stored as compressed 2 MiB "
                    "frames (as pack --compress writes it), fetched a frame at a time; one row, "
                    "beside the frame limit TTFB + compressed frame/BW + decompression");
  fetch->add_flag("--json", fetch_flags->json, "Print one JSON document instead of the table");
  add_log_flag(*fetch, fetch_flags->log_level);

  auto hit_flags = std::make_shared<HitBenchFlags>();
  CLI::App* hit = bench->add_subcommand(
      "hit",
      "Cost of reads whose blocks are cached: slice and read_at of 4 KiB, 1 and 2 threads, "
      "and cached_view and read through a disk of several builds");
  hit->add_flag("--json", hit_flags->json, "Print one JSON document instead of the table");
  add_log_flag(*hit, hit_flags->log_level);

  auto seq_flags = std::make_shared<SeqBenchFlags>();
  CLI::App* seq = bench->add_subcommand(
      "seq", "Cold sequential read of a whole object behind a simulated store, in MB/s");
  seq->add_option("--profile", seq_flags->profile,
                  "gcs (20ms, 100MB/s), nfs (1ms, 500MB/s) or ttfb=MS,bw=MBPS")
      ->required();
  seq->add_option("--size", seq_flags->size, "Object size, e.g. 1GiB")->capture_default_str();
  seq->add_option("--parallel", seq_flags->parallel,
                  "Streams kept transferring (the next request goes out one first-byte time before "
                  "a stream ends)")
      ->capture_default_str()
      ->check(at_least(1));
  seq->add_option("--fetch", seq_flags->fetch, "Fetch strategy")->capture_default_str();
  seq->add_option("--compressed", seq_flags->compressed,
                  "zstd or lz4: read a memory-like image stored as compressed 2 MiB frames (as "
                  "pack --compress writes it) instead of plain chunks; MB/s of uncompressed data, "
                  "beside the lower of the streams' limit (x the ratio) and the cores' "
                  "decompression limit");
  seq->add_flag("--json", seq_flags->json, "Print one JSON document instead of the line");
  add_log_flag(*seq, seq_flags->log_level);

  auto uffd_flags = std::make_shared<UffdBenchFlags>();
  CLI::App* uffd = bench->add_subcommand(
      "uffd",
      "The UFFD handler under a stand-in Firecracker VM: cold and warm fault latency (beside a "
      "minimal handler), and a working set swept with and without its recorded prefetch");
  uffd->add_option("--profile", uffd_flags->profile,
                   "gcs (20ms, 100MB/s), nfs (1ms, 500MB/s) or ttfb=MS,bw=MBPS")
      ->required();
  uffd->add_option("--memfile-size", uffd_flags->memfile_size, "Guest memory size")
      ->capture_default_str();
  uffd->add_option("--working-set", uffd_flags->working_set,
                   "Bytes the VM touches (whole 4 MiB chunks)")
      ->capture_default_str();
  uffd->add_option("--vcpus", uffd_flags->vcpus, "Threads touching the working set")
      ->capture_default_str()
      ->check(at_least(1));
  uffd->add_option("--parallel", uffd_flags->parallel, "Streams prefetching at once")
      ->capture_default_str()
      ->check(at_least(1));
  uffd->add_flag("--json", uffd_flags->json, "Print one JSON document instead of the table");
  add_log_flag(*uffd, uffd_flags->log_level);

  auto fleet_flags = std::make_shared<FleetBenchFlags>();
  CLI::App* fleet = bench->add_subcommand(
      "fleet",
      "VMs starting at once from one template behind a simulated store, each reading the same "
      "working set at random, then a second wave: read latency and upstream bytes per wave, "
      "beside one VM's alone and the physical limit");
  fleet
      ->add_option("--profile", fleet_flags->profile,
                   "gcs (20ms, 100MB/s), nfs (1ms, 500MB/s) or ttfb=MS,bw=MBPS")
      ->required();
  fleet->add_option("--vms", fleet_flags->vms, "VMs in each wave")
      ->capture_default_str()
      ->check(at_least(1));
  fleet
      ->add_option("--working-set", fleet_flags->working_set,
                   "Bytes of 4 KiB blocks, spread over the disk, each VM reads")
      ->capture_default_str();
  fleet->add_option("--disk-size", fleet_flags->disk_size,
                    "The template's disk (default: four times the working set)");
  fleet->add_option("--queue-depth", fleet_flags->queue_depth, "Reads each VM has in flight")
      ->capture_default_str()
      ->check(at_least(1));
  fleet->add_option("--fetch", fleet_flags->fetch, "Fetch strategy")->capture_default_str();
  fleet->add_option("--seed", fleet_flags->seed, "Seed of the working set and the VMs' orders")
      ->capture_default_str();
  fleet->add_flag("--json", fleet_flags->json, "Print one JSON document instead of the table");
  add_log_flag(*fleet, fleet_flags->log_level);

  return [fetch, fetch_flags, hit, hit_flags, seq, seq_flags, uffd, uffd_flags, fleet,
          fleet_flags]() -> int {
    if (fleet->parsed()) return run_fleet_bench_command(*fleet_flags);
    if (uffd->parsed()) return run_uffd_bench_command(*uffd_flags);
    if (fetch->parsed()) return run_fetch_bench_command(*fetch_flags);
    if (hit->parsed()) return run_hit_bench_command(*hit_flags);
    if (seq->parsed()) return run_seq_bench_command(*seq_flags);
    return kExitUsage;
  };
}

}  // namespace lazyblock::cli
