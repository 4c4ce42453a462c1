#include "cli/flags.h"

#include <charconv>
#include <cstdio>
#include <optional>

#include "cli/output.h"
#include "common/log.h"
#include "common/units.h"

namespace lazyblock::cli {
namespace {

constexpr const char* kStoreGroup = "Store";
constexpr const char* kReadGroup = "Reading";
constexpr const char* kTestingGroup = "Testing";

// --log-level given before the command, if it was; and whether the
// command's own --log-level was given (one command runs per process).
std::optional<std::string> global_log_level;
bool command_log_level_given = false;

}  // namespace

void add_store_flags(CLI::App& command, StoreFlags& flags, StoreUse use) {
  command
      .add_option("--store", flags.store,
                  "Where the objects live: file:///DIR, http(s)://HOST/PREFIX, s3://BUCKET/PREFIX "
                  "or gs://BUCKET/PREFIX (settings from AWS_* / GCS_* variables, see README)")
      ->required()
      ->group(kStoreGroup);
  command
      .add_option("--retry", flags.retry,
                  "Retries of a transient failure (connection reset, 5xx, SlowDown, truncated "
                  "response), with capped exponential backoff; streams resume where they broke. "
                  "'deadline': for as long as --timeout leaves time; N: also at most N in a row; "
                  "0: none")
      ->capture_default_str()
      ->group(kStoreGroup);
  command
      .add_option("--ca-file", flags.ca_file,
                  "CA certificates (PEM) to verify an https store's server with, instead of the "
                  "system's (default: $AWS_CA_BUNDLE, else $SSL_CERT_FILE)")
      ->group(kStoreGroup);
  command
      .add_option("--faults", flags.faults,
                  "Inject faults: fail-open, fail-after=N, stall-after=N, short=N, size=N, "
                  "times=N (only the first N calls), comma-separated")
      ->group(kTestingGroup);
  command
      .add_option("--timeout", flags.timeout,
                  use == StoreUse::kRead ? "Deadline of each chunk fetch, e.g. 250ms, 5s, 2m"
                                         : "Deadline of each chunk fetch (of the parent's "
                                           "blocks) and of retries, e.g. 250ms, 5s, 2m")
      ->capture_default_str()
      ->group(kStoreGroup);
  if (use == StoreUse::kWrite) return;
  command
      .add_option("--fetch", flags.fetch,
                  "Fetch strategy: split (a far reader gets a stream of its own), streaming "
                  "(one stream per chunk, each reader woken as its bytes arrive) or full (wait "
                  "for whole 4 MiB chunks)")
      ->capture_default_str()
      ->group(kReadGroup);
  command
      .add_option("--simulate", flags.simulate,
                  "Make the store behave like a remote one: gcs, nfs or ttfb=20ms,bw=100MB/s")
      ->group(kTestingGroup);
  command
      .add_option("--cache-dir", flags.cache_dir,
                  "Persistent chunk cache shared by processes (a local disk or an NFS mount): "
                  "chunks read are kept there, whole and checksummed, and served from there "
                  "next time")
      ->group(kReadGroup);
  command
      .add_option("--cache-size", flags.cache_size,
                  "Bound of --cache-dir; the least recently used chunks go first")
      ->capture_default_str()
      ->group(kReadGroup);
  command
      .add_option("--parallel", flags.parallel,
                  "Streams a sequential read keeps transferring ahead of the reader")
      ->capture_default_str()
      ->check(at_least(1))
      ->group(kReadGroup);
  command
      .add_flag("--no-readahead", flags.no_readahead,
                "Do not read ahead of runs of sequential reads (whole-object copies still do)")
      ->group(kReadGroup);
}

CLI::Validator at_least(long long least) {
  return CLI::Validator(
      [least](std::string& text) -> std::string {
        long long value = 0;
        size_t used = 0;
        try {
          value = std::stoll(text, &used);
        } catch (const std::exception&) {
          used = 0;
        }
        if (used == 0 || used != text.size() || value < least) {
          return "must be a whole number of at least " + std::to_string(least) + ", not '" + text +
                 "'";
        }
        return "";
      },
      "INT>=" + std::to_string(least));
}

void add_log_flag(CLI::App& command, std::string& level) {
  command
      .add_option("--log-level", level,
                  "debug, info, warn, error or off (may also come before the command)")
      ->capture_default_str()
      ->each([](const std::string&) { command_log_level_given = true; });
}

void add_global_flags(CLI::App& app) {
  app.add_option_function<std::string>(
      "--log-level", [](const std::string& level) { global_log_level = level; },
      "debug, info, warn, error or off, for any command (its own --log-level wins)");
}

void add_progress_flags(CLI::App& command) {
  CLI::Option* progress = command.add_flag_callback(
      "--progress", [] { set_progress_mode(ProgressMode::kOn); },
      "Show progress (rate, time left) on stderr even when it is not a terminal");
  command
      .add_flag_callback(
          "--quiet", [] { set_progress_mode(ProgressMode::kOff); },
          "Show no progress, even on a terminal")
      ->excludes(progress);
}

Status apply_log_level(const std::string& command_level) {
  const std::string& level =
      global_log_level && !command_log_level_given ? *global_log_level : command_level;
  Result<LogLevel> parsed = parse_log_level(level);
  if (!parsed) return parsed.status();
  set_log_level(*parsed);
  return Status::ok();
}

Result<ChunkerOptions> chunker_options(const StoreFlags& flags) {
  ChunkerOptions options;
  Result<FetchStrategy> strategy = parse_fetch_strategy(flags.fetch);
  if (!strategy) return strategy.status();
  options.strategy = *strategy;
  Result<std::chrono::nanoseconds> timeout = parse_duration(flags.timeout);
  if (!timeout) return timeout.status();
  if (timeout->count() <= 0) return Status::invalid_argument("--timeout must be positive");
  options.fetch_timeout = *timeout;
  options.parallel = flags.parallel;
  options.readahead = !flags.no_readahead;
  if (!flags.simulate.empty()) {
    // The simulated link is the best first guess of the link.
    Result<SimulateProfile> profile = SimulateProfile::parse(flags.simulate);
    if (!profile) return profile.status();
    options.expected_ttfb = profile->ttfb;
    options.expected_bandwidth = profile->bytes_per_second;
  }
  return options;
}

Result<StoreStackOptions> store_stack_options(const StoreFlags& flags) {
  StoreStackOptions options;
  options.ca_file = flags.ca_file;
  if (!flags.simulate.empty()) {
    Result<SimulateProfile> profile = SimulateProfile::parse(flags.simulate);
    if (!profile) return profile.status();
    options.simulate = *profile;
  }
  if (flags.retry == "deadline") {
    options.retry = RetryPolicy{};
  } else {
    int retries = 0;
    const char* end = flags.retry.data() + flags.retry.size();
    const auto [stop, error] = std::from_chars(flags.retry.data(), end, retries);
    if (flags.retry.empty() || error != std::errc() || stop != end || retries < 0) {
      return Status::invalid_argument("--retry " + flags.retry +
                                      ": expected 'deadline' or a count of retries");
    }
    if (retries > 0) {
      RetryPolicy retry;
      retry.retries = retries;
      options.retry = retry;
    }
  }
  if (!flags.cache_dir.empty()) {
    DiskCacheOptions cache;
    cache.dir = flags.cache_dir;
    cache.chunk_size = ChunkerOptions{}.chunk_size;  // so that a chunker's chunk is one file
    Result<uint64_t> size = parse_size(flags.cache_size);
    if (!size) return size.status().with_context("--cache-size");
    cache.max_bytes = *size;
    options.disk_cache = cache;
  }
  if (!flags.faults.empty()) {
    Result<FaultSpec> faults = FaultSpec::parse(flags.faults);
    if (!faults) return faults.status();
    options.faults = *faults;
  }
  return options;
}

int report_failure(const Status& status) {
  const bool usage = status.code() == StatusCode::kInvalidArgument;
  std::fprintf(stderr, "lazyblock: %s: %s\n", usage ? "usage" : "error", status.message().c_str());
  return usage ? kExitUsage : kExitError;
}

}  // namespace lazyblock::cli
