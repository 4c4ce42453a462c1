#include "daemon/metrics.h"

#include <cmath>

#include <fmt/format.h>

namespace lazyblock::daemon {

const std::array<double, Histogram::kBuckets> Histogram::kBounds = {
    10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3,
    5e-3,  10e-3, 25e-3, 50e-3,  100e-3, 250e-3, 1.0,  10.0};

Histogram::Histogram() = default;

void Histogram::observe(std::chrono::nanoseconds duration) {
  const double seconds = std::chrono::duration<double>(duration).count();
  size_t bucket = 0;
  while (bucket < kBuckets && seconds > kBounds[bucket]) ++bucket;
  counts_[bucket].fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<uint64_t>(std::max<int64_t>(0, duration.count())),
                    std::memory_order_relaxed);
}

Histogram::Snapshot Histogram::snapshot() const {
  Snapshot snapshot;
  uint64_t cumulative = 0;
  for (size_t i = 0; i < kBuckets; ++i) {
    cumulative += counts_[i].load(std::memory_order_relaxed);
    snapshot.buckets.emplace_back(kBounds[i], cumulative);
  }
  snapshot.count = cumulative + counts_[kBuckets].load(std::memory_order_relaxed);
  snapshot.sum_seconds = static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) / 1e9;
  return snapshot;
}

std::string_view status_label(StatusCode code) {
  switch (code) {
    case StatusCode::kOk:
      return "ok";
    case StatusCode::kNotFound:
      return "not_found";
    case StatusCode::kInvalidArgument:
      return "invalid_argument";
    case StatusCode::kOutOfRange:
      return "out_of_range";
    case StatusCode::kIoError:
      return "io_error";
    case StatusCode::kCorruption:
      return "corruption";
    case StatusCode::kTimeout:
      return "timeout";
    case StatusCode::kCancelled:
      return "cancelled";
    case StatusCode::kUnavailable:
      return "unavailable";
    case StatusCode::kNoSpace:
      return "no_space";
    case StatusCode::kAlreadyExists:
      return "already_exists";
  }
  return "unknown";
}

namespace {

std::string escaped(std::string_view value) {
  std::string out;
  for (const char c : value) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == '"') {
      out += "\\\"";
    } else if (c == '\n') {
      out += "\\n";
    } else {
      out += c;
    }
  }
  return out;
}

std::string label_text(const MetricsText::Labels& labels) {
  if (labels.empty()) return "";
  std::string out = "{";
  for (size_t i = 0; i < labels.size(); ++i) {
    if (i > 0) out += ',';
    out += fmt::format("{}=\"{}\"", labels[i].first, escaped(labels[i].second));
  }
  return out + "}";
}

// Values as the format writes them: integers without a fraction.
std::string number(double value) {
  if (std::isinf(value)) return value > 0 ? "+Inf" : "-Inf";
  if (value == std::floor(value) && std::fabs(value) < 1e15) {
    return fmt::format("{}", static_cast<int64_t>(value));
  }
  return fmt::format("{}", value);
}

}  // namespace

void MetricsText::family(std::string_view name, std::string_view type, std::string_view help) {
  text_ += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
}

void MetricsText::sample(std::string_view name, const Labels& labels, double value) {
  text_ += fmt::format("{}{} {}\n", name, label_text(labels), number(value));
}

void MetricsText::histogram(std::string_view name, const Labels& labels,
                            const Histogram::Snapshot& values) {
  for (const auto& [bound, count] : values.buckets) {
    Labels with = labels;
    with.emplace_back("le", fmt::format("{}", bound));
    sample(fmt::format("{}_bucket", name), with, static_cast<double>(count));
  }
  Labels with = labels;
  with.emplace_back("le", "+Inf");
  sample(fmt::format("{}_bucket", name), with, static_cast<double>(values.count));
  sample(fmt::format("{}_sum", name), labels, values.sum_seconds);
  sample(fmt::format("{}_count", name), labels, static_cast<double>(values.count));
}

}  // namespace lazyblock::daemon
