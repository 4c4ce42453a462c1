// Metrics: the counters and histograms of the daemon, and their rendering in
// Prometheus's text exposition format 0.0.4.
//
// Counters are atomics bumped on the paths they count (store calls, page
// faults, NBD requests), never behind a lock; /metrics reads them at any
// moment, so a scrape sees each counter at some instant, not all at one.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/status.h"

namespace lazyblock::daemon {

// Observations of a duration in fixed buckets (upper bounds in seconds).
class Histogram {
 public:
  // Buckets from 10 us to 10 s, a few per decade: a cached read, a fetch
  // over a LAN, a fetch from a far store.
  Histogram();

  void observe(std::chrono::nanoseconds duration);

  struct Snapshot {
    std::vector<std::pair<double, uint64_t>> buckets;  // (upper bound, cumulative count)
    uint64_t count = 0;
    double sum_seconds = 0;
  };
  Snapshot snapshot() const;

 private:
  static constexpr size_t kBuckets = 16;
  static const std::array<double, kBuckets> kBounds;
  std::array<std::atomic<uint64_t>, kBuckets + 1> counts_{};  // the last: above every bound
  std::atomic<uint64_t> sum_ns_{0};
};

// A label for each StatusCode ("not_found", "io_error", ...).
std::string_view status_label(StatusCode code);
inline constexpr size_t kStatusCodes = static_cast<size_t>(StatusCode::kAlreadyExists) + 1;

// Builds an exposition: each metric's HELP and TYPE lines once, then its
// samples. Label values are escaped as the format asks.
class MetricsText {
 public:
  using Labels = std::vector<std::pair<std::string, std::string>>;

  // Starts metric `name` of `type` ("counter", "gauge", "histogram").
  void family(std::string_view name, std::string_view type, std::string_view help);
  void sample(std::string_view name, const Labels& labels, double value);
  void histogram(std::string_view name, const Labels& labels, const Histogram::Snapshot& values);

  const std::string& text() const { return text_; }

 private:
  std::string text_;
};

}  // namespace lazyblock::daemon
