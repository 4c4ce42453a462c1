#include "storage/simulate_store.h"

#include <algorithm>
#include <cmath>
#include <optional>

#include <fmt/format.h>

#include "common/units.h"

namespace lazyblock {
namespace {

// A read returns once this much (or the rest of the range, or the buffer) is
// due: about what one socket read brings, so waiters are woken at a fine
// grain without a system call per byte.
constexpr uint64_t kReadGrain = 16 * 1024;

class SimulatedReader final : public RangeReader {
 public:
  SimulatedReader(std::unique_ptr<RangeReader> inner, const SimulateProfile& profile,
                  Clock::time_point first_byte, IoContext io, std::string name)
      : inner_(std::move(inner)),
        bytes_per_second_(profile.bytes_per_second),
        first_byte_(first_byte),
        io_(std::move(io)),
        name_(std::move(name)) {}

  Result<size_t> read(std::span<std::byte> buffer) override {
    const uint64_t remaining = inner_->range_length() - delivered_;
    const uint64_t want = std::min<uint64_t>(buffer.size(), remaining);
    if (want == 0) return inner_->read(buffer);  // the end, or whatever the inner stream says
    // Wait until the next min(want, grain) bytes are due, then take all that are.
    const uint64_t minimum = std::min(want, kReadGrain);
    LB_RETURN_IF_ERROR(io_.sleep_until(due_time(delivered_ + minimum), name_));
    const uint64_t due = bytes_due(Clock::now());
    const uint64_t take = std::clamp(due - std::min(due, delivered_), minimum, want);
    size_t done = 0;
    while (done < take) {
      Result<size_t> got = inner_->read(buffer.subspan(done, take - done));
      if (!got) return got.status();
      if (*got == 0) break;  // the inner stream ended early: report what arrived
      done += *got;
    }
    delivered_ += done;
    return done;
  }
  uint64_t object_size() const override { return inner_->object_size(); }
  std::string object_version() const override { return inner_->object_version(); }
  uint64_t range_length() const override { return inner_->range_length(); }

 private:
  // When the first `bytes` bytes of the stream have arrived.
  Clock::time_point due_time(uint64_t bytes) const {
    return first_byte_ + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(
                             static_cast<double>(bytes) / bytes_per_second_));
  }
  // How many bytes of the stream have arrived at `now`.
  uint64_t bytes_due(Clock::time_point now) const {
    if (now <= first_byte_) return 0;
    return static_cast<uint64_t>(std::chrono::duration<double>(now - first_byte_).count() *
                                 bytes_per_second_);
  }

  const std::unique_ptr<RangeReader> inner_;
  const double bytes_per_second_;
  const Clock::time_point first_byte_;
  const IoContext io_;
  const std::string name_;
  uint64_t delivered_ = 0;
};

}  // namespace

Result<SimulateProfile> SimulateProfile::parse(std::string_view text) {
  if (text == "gcs") return SimulateProfile{std::chrono::milliseconds(20), 100e6};
  if (text == "nfs") return SimulateProfile{std::chrono::milliseconds(1), 500e6};
  const auto invalid = [&](std::string_view why) {
    return Status::invalid_argument(fmt::format(
        "invalid store profile '{}': {} (expected gcs, nfs or ttfb=20ms,bw=100MB/s)", text, why));
  };
  std::optional<std::chrono::nanoseconds> ttfb;
  std::optional<double> bandwidth;
  size_t start = 0;
  while (start < text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    start = comma + 1;
    const size_t equals = item.find('=');
    if (equals == std::string_view::npos) return invalid(fmt::format("'{}' has no '='", item));
    const std::string_view name = item.substr(0, equals);
    std::string value(item.substr(equals + 1));
    const bool bare = !value.empty() && value.find_first_not_of("0123456789.") == std::string::npos;
    if (name == "ttfb") {
      Result<std::chrono::nanoseconds> parsed = parse_duration(bare ? value + "ms" : value);
      if (!parsed) return invalid(parsed.status().message());
      ttfb = *parsed;
    } else if (name == "bw") {
      Result<double> parsed = parse_rate(bare ? value + "MB/s" : value);
      if (!parsed) return invalid(parsed.status().message());
      bandwidth = *parsed;
    } else {
      return invalid(fmt::format("unknown setting '{}'", name));
    }
  }
  if (!ttfb || !bandwidth) return invalid("both ttfb and bw are needed");
  return SimulateProfile{*ttfb, *bandwidth};
}

std::string SimulateProfile::to_string() const {
  const double ms = std::chrono::duration<double, std::milli>(ttfb).count();
  const double mb = bytes_per_second / 1e6;
  return fmt::format("ttfb={:.4g}ms,bw={:.4g}MB/s", ms, mb);
}

SimulateStore::SimulateStore(std::shared_ptr<ObjectStore> inner, SimulateProfile profile)
    : StoreLayer(std::move(inner)), profile_(profile) {}

Result<ObjectInfo> SimulateStore::stat_info(const std::string& key, const IoContext& io) {
  LB_RETURN_IF_ERROR(io.sleep_until(Clock::now() + profile_.ttfb, "stat " + key));
  return StoreLayer::stat_info(key, io);
}

Result<std::unique_ptr<RangeReader>> SimulateStore::open_range(const std::string& key,
                                                               uint64_t offset, uint64_t length,
                                                               const IoContext& io) {
  const Clock::time_point first_byte = Clock::now() + profile_.ttfb;
  Result<std::unique_ptr<RangeReader>> inner = StoreLayer::open_range(key, offset, length, io);
  if (!inner) return inner.status();
  const std::string name = fmt::format("read {} [{}, +{})", key, offset, length);
  // The response's headers come with its first byte.
  LB_RETURN_IF_ERROR(io.sleep_until(first_byte, name));
  return std::unique_ptr<RangeReader>(
      new SimulatedReader(std::move(inner).value(), profile_, first_byte, io, name));
}

std::string SimulateStore::describe() const {
  return fmt::format("simulate({}) over {}", profile_.to_string(), StoreLayer::describe());
}

}  // namespace lazyblock
