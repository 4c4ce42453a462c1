#include "bench/seq_bench.h"

#include <sys/prctl.h>

#include <fstream>
#include <thread>

#include <fmt/format.h>

#include "bench/bench_util.h"
#include "bench/compressed_object.h"
#include "common/units.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

constexpr uint64_t kPatternSeed = 5;
const std::string kKey = "bench/seq";
// How much the cores' and new memory's limits are measured on.
constexpr uint64_t kLimitProbe = 128 * kMiB;

// Counts what it is given; the timed pass keeps the sink out of the figure.
class CountingSink final : public ByteSink {
 public:
  Status write(std::span<const std::byte> data) override {
    bytes += data.size();
    return Status::ok();
  }
  uint64_t bytes = 0;
};

// Checks what it is given against the pattern.
class VerifyingSink final : public ByteSink {
 public:
  Status write(std::span<const std::byte> data) override {
    const size_t bad = testing::first_pattern_mismatch(kPatternSeed, offset, data);
    if (bad != data.size()) {
      return Status::corruption(fmt::format("bench seq: wrong byte at offset {}", offset + bad));
    }
    offset += data.size();
    return Status::ok();
  }
  uint64_t offset = 0;
};

// Writes the pattern object straight to the store's directory, in pieces,
// so that a large object need not sit in memory whole.
Status write_object(const std::filesystem::path& path, uint64_t size) {
  std::filesystem::create_directories(path.parent_path());
  std::ofstream out(path, std::ios::binary);
  constexpr uint64_t kPiece = 16 * kMiB;
  for (uint64_t offset = 0; offset < size; offset += kPiece) {
    const std::vector<std::byte> piece =
        testing::make_pattern(kPatternSeed, offset, std::min(kPiece, size - offset));
    out.write(reinterpret_cast<const char*>(piece.data()),
              static_cast<std::streamsize>(piece.size()));
  }
  out.close();
  if (!out) return Status::io_error("bench seq: cannot write the object to " + path.string());
  return Status::ok();
}

// Which of a compressed pass's limits is the lowest.
const char* binding_limit(const SeqBenchReport& report) {
  if (report.limit_mb_per_s == report.stream_limit_mb_per_s) return "streams";
  if (report.limit_mb_per_s == report.cores_limit_mb_per_s) return "cores";
  return "new memory";
}

}  // namespace

Result<SeqBenchReport> run_seq_bench(const SeqBenchOptions& options) {
  if (options.size == 0 || options.parallel < 1) {
    return Status::invalid_argument("bench seq needs a size > 0 and --parallel >= 1");
  }
  ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);  // as in bench fetch: precise pacing
  Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
  if (!scratch) return scratch.status();
  std::optional<CompressedObject> compressed;
  if (options.compressed) {
    Result<CompressedObject> written = write_compressed_object(
        scratch->path() / "store" / kKey, options.size, *options.compressed, kPatternSeed);
    if (!written) return written.status();
    compressed = std::move(written).value();
  } else {
    LB_RETURN_IF_ERROR(write_object(scratch->path() / "store" / kKey, options.size));
  }
  Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch->path() / "store");
  if (!files) return files.status();
  auto store = std::make_shared<SimulateStore>(*files, options.profile);

  ChunkerOptions chunker_options;
  chunker_options.strategy = options.strategy;
  chunker_options.parallel = options.parallel;
  chunker_options.cache_dir = scratch->path();
  chunker_options.expected_ttfb = options.profile.ttfb;
  chunker_options.expected_bandwidth = options.profile.bytes_per_second;
  Result<std::unique_ptr<Chunker>> chunker =
      compressed ? make_frame_chunker(store, kKey, compressed->geometry, chunker_options)
                 : make_chunker(store, kKey, options.size, chunker_options);
  if (!chunker) return chunker.status();

  // The cores' limit, measured in the same minutes as the timed pass (the
  // machine may be shared).
  double cores_limit = 0;
  double new_memory = 0;
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  if (compressed) {
    Result<double> measured = measure_decode_and_cache(
        scratch->path() / "store" / kKey, *compressed, scratch->path(), cores, kLimitProbe);
    if (!measured) return measured.status();
    cores_limit = *measured;
    Result<double> touched = measure_new_memory(cores, kLimitProbe);
    if (!touched) return touched.status();
    new_memory = *touched;
  }

  CountingSink counted;
  const double cpu_before = process_cpu_seconds();
  const auto begin = Clock::now();
  LB_RETURN_IF_ERROR((*chunker)->write_to(counted));
  const double seconds = std::chrono::duration<double>(Clock::now() - begin).count();
  const double cpu_seconds = process_cpu_seconds() - cpu_before;
  if (counted.bytes != options.size) {
    return Status::corruption(
        fmt::format("bench seq: wrote {} of {} bytes", counted.bytes, options.size));
  }
  // Untimed, from the cache.
  if (compressed) {
    MemoryImageChecker verified(options.size, kPatternSeed);
    LB_RETURN_IF_ERROR((*chunker)->write_to(verified));
  } else {
    VerifyingSink verified;
    LB_RETURN_IF_ERROR((*chunker)->write_to(verified));
  }

  SeqBenchReport report;
  report.options = options;
  report.seconds = seconds;
  report.cpu_seconds = cpu_seconds;
  report.mb_per_s = static_cast<double>(options.size) / 1e6 / seconds;
  report.limit_mb_per_s = options.parallel * options.profile.bytes_per_second / 1e6;
  report.requests = (*chunker)->stats().requests;
  report.bytes_fetched = (*chunker)->stats().bytes;
  if (compressed) {
    report.ratio = compressed->ratio();
    report.stream_limit_mb_per_s = report.limit_mb_per_s * report.ratio;
    report.decompress_mb_per_s_per_core = compressed->decompress_bytes_per_second / 1e6;
    report.cores = cores;
    report.decompress_limit_mb_per_s = report.cores * report.decompress_mb_per_s_per_core;
    report.cores_limit_mb_per_s = cores_limit / 1e6;
    report.new_memory_mb_per_s = new_memory / 1e6;
    report.limit_mb_per_s = std::min(
        {report.stream_limit_mb_per_s, report.cores_limit_mb_per_s, report.new_memory_mb_per_s});
  }
  return report;
}

std::string format_seq_report(const SeqBenchReport& report) {
  const SeqBenchOptions& o = report.options;
  if (o.compressed) {
    return fmt::format(
        "bench seq: cold write_to of a {} memory-like image stored as {} frames of 2 MiB "
        "({:.2f}x), profile {} ({}), {} streams\n"
        "{:.0f} MB/s of uncompressed data in {:.2f} s ({:.0f}% of the limit {:.0f} MB/s, the "
        "{}), {} requests, {:.1f} MB fetched, {:.2f} s of CPU, output byte-exact\n"
        "limits: the streams' {:.0f} MB/s ({} x {:.0f} MB/s x {:.2f}); the cores' {:.0f} MB/s "
        "measured just before ({} threads decoding frames and writing them into a file at once; "
        "decoding alone: {} x {:.0f} MB/s of {} per core = {:.0f} MB/s), "
        "and new memory's {:.0f} MB/s ({} threads touching {} of new pages: every byte "
        "delivered lands in a new page of the cache file)\n",
        format_size(o.size), frame_codec_name(*o.compressed), report.ratio, o.profile_name,
        o.profile.to_string(), o.parallel, report.mb_per_s, report.seconds,
        100 * report.mb_per_s / report.limit_mb_per_s, report.limit_mb_per_s, binding_limit(report),
        report.requests, static_cast<double>(report.bytes_fetched) / 1e6, report.cpu_seconds,
        report.stream_limit_mb_per_s, o.parallel, o.profile.bytes_per_second / 1e6, report.ratio,
        report.cores_limit_mb_per_s, report.cores, report.cores,
        report.decompress_mb_per_s_per_core, frame_codec_name(*o.compressed),
        report.decompress_limit_mb_per_s, report.new_memory_mb_per_s, report.cores,
        format_size(kLimitProbe));
  }
  return fmt::format(
      "bench seq: cold write_to of a {} object, profile {} ({}), {} streams, {}\n"
      "{:.0f} MB/s in {:.2f} s ({:.0f}% of the limit {:.0f} MB/s = {} streams x {:.0f} MB/s), "
      "{} requests, {:.2f} s of CPU, output byte-exact\n",
      format_size(o.size), o.profile_name, o.profile.to_string(), o.parallel,
      fetch_strategy_name(o.strategy), report.mb_per_s, report.seconds,
      100 * report.mb_per_s / report.limit_mb_per_s, report.limit_mb_per_s, o.parallel,
      o.profile.bytes_per_second / 1e6, report.requests, report.cpu_seconds);
}

nlohmann::json seq_report_json(const SeqBenchReport& report) {
  nlohmann::json doc = {{"profile", report.options.profile_name},
                        {"size", report.options.size},
                        {"mb_per_s", report.mb_per_s},
                        {"cpu_seconds", report.cpu_seconds},
                        {"limit_mb_per_s", report.limit_mb_per_s},
                        {"requests", report.requests},
                        {"bytes_fetched", report.bytes_fetched}};
  if (report.options.compressed) {
    doc["compressed"] = frame_codec_name(*report.options.compressed);
    doc["ratio"] = report.ratio;
    doc["stream_limit_mb_per_s"] = report.stream_limit_mb_per_s;
    doc["decompress_mb_per_s_per_core"] = report.decompress_mb_per_s_per_core;
    doc["cores"] = report.cores;
    doc["decompress_limit_mb_per_s"] = report.decompress_limit_mb_per_s;
    doc["cores_limit_mb_per_s"] = report.cores_limit_mb_per_s;
    doc["new_memory_mb_per_s"] = report.new_memory_mb_per_s;
    doc["binds"] = binding_limit(report);
  }
  return doc;
}

}  // namespace lazyblock
