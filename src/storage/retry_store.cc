#include "storage/retry_store.h"

#include <algorithm>
#include <random>

#include <fmt/format.h>

#include "common/log.h"

namespace lazyblock {
namespace {

// Full jitter (a delay drawn uniformly from [0, cap)): of the usual backoff
// schemes, the one that spreads a crowd of failing clients best.
std::chrono::nanoseconds jittered_delay(const RetryPolicy& policy, int attempt) {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  const int doublings = std::min(attempt - 1, 30);
  const auto cap = std::min(policy.max_delay, policy.base_delay * (int64_t{1} << doublings));
  if (cap.count() <= 0) return std::chrono::nanoseconds::zero();
  return std::chrono::nanoseconds(std::uniform_int_distribution<int64_t>(0, cap.count() - 1)(rng));
}

double milliseconds(std::chrono::nanoseconds duration) {
  return std::chrono::duration<double, std::milli>(duration).count();
}

}  // namespace

bool is_transient(const Status& status) { return status.code() == StatusCode::kUnavailable; }

class RetryStore::Reader final : public RangeReader {
 public:
  Reader(RetryStore& store, std::string key, uint64_t offset, std::unique_ptr<RangeReader> inner,
         IoContext io, Failures failures)
      : store_(store),
        key_(std::move(key)),
        offset_(offset),
        object_size_(inner->object_size()),
        version_(inner->object_version()),
        range_length_(inner->range_length()),
        io_(std::move(io)),
        inner_(std::move(inner)),
        failures_(failures) {}

  Result<size_t> read(std::span<std::byte> buffer) override {
    for (;;) {
      Result<size_t> got = inner_->read(buffer);
      if (got && *got > 0) {
        delivered_ += *got;
        failures_ = Failures{};
        return got;
      }
      if (got && delivered_ >= range_length_) return got;  // the end, as promised
      const Status failure =
          got ? Status::unavailable(fmt::format("{}: read {}: the response ended after {} of {} "
                                                "bytes",
                                                store_.location(), key_, delivered_, range_length_))
              : got.status();
      const Status verdict = store_.before_retry(failures_, failure, name(), io_);
      if (!verdict.is_ok()) {
        // An early end stays an early end (the caller checks the length);
        // an error is reported as it came, or as the backoff's timeout.
        if (got && verdict.code() == StatusCode::kUnavailable) return got;
        return verdict;
      }
      Result<std::unique_ptr<RangeReader>> reopened = store_.open_with_retries(
          key_, offset_ + delivered_, range_length_ - delivered_, io_, failures_);
      if (!reopened) return reopened.status();
      if ((*reopened)->object_size() != object_size_ || (*reopened)->object_version() != version_) {
        return Status::corruption(fmt::format(
            "{}: read {}: the object changed between attempts (size {} to {}, version '{}' to "
            "'{}')",
            store_.location(), key_, object_size_, (*reopened)->object_size(), version_,
            (*reopened)->object_version()));
      }
      inner_ = std::move(reopened).value();
    }
  }

  uint64_t object_size() const override { return object_size_; }
  std::string object_version() const override { return version_; }
  uint64_t range_length() const override { return range_length_; }

 private:
  std::string name() const {
    return fmt::format("{}: read {} [{}, +{})", store_.location(), key_, offset_ + delivered_,
                       range_length_ - delivered_);
  }

  RetryStore& store_;
  const std::string key_;
  const uint64_t offset_;
  const uint64_t object_size_;
  const std::string version_;
  const uint64_t range_length_;
  const IoContext io_;
  std::unique_ptr<RangeReader> inner_;
  uint64_t delivered_ = 0;
  Failures failures_;  // in a row, without a byte delivered
};

RetryStore::RetryStore(std::shared_ptr<ObjectStore> inner, RetryPolicy policy)
    : StoreLayer(std::move(inner)), policy_(policy) {}

Status RetryStore::before_retry(Failures& failures, const Status& failure, const std::string& what,
                                const IoContext& io) {
  const Clock::time_point now = Clock::now();
  if (++failures.count == 1) failures.first = now;
  if (!is_transient(failure)) return failure;
  const int done = failures.count - 1;  // retries already made of this call
  const auto give_up = [&] {
    if (done == 0) return failure;
    return Status::unavailable(fmt::format("{} (gave up after {} {} over {:.1f} s)",
                                           failure.message(), done, done == 1 ? "retry" : "retries",
                                           milliseconds(now - failures.first) / 1000));
  };
  if (policy_.retries && done >= *policy_.retries) return give_up();
  const Clock::time_point end = io.deadline == Clock::time_point::max()
                                    ? failures.first + policy_.window_without_deadline
                                    : io.deadline;
  // The backoff must end with an attempt's worth of time left.
  const Clock::time_point latest_wake = end - policy_.attempt_reserve;
  if (now >= latest_wake) return give_up();
  const std::chrono::nanoseconds delay = std::min<std::chrono::nanoseconds>(
      jittered_delay(policy_, failures.count), latest_wake - now);
  // The failure names the store and the object already.
  log(LogLevel::kInfo, "{} (retry {}{} in {:.1f} ms)", failure.message(), failures.count,
      policy_.retries ? fmt::format(" of {}", *policy_.retries) : std::string(),
      milliseconds(delay));
  retries_.fetch_add(1, std::memory_order_relaxed);
  return io.sleep_until(now + delay, what + " (backing off to retry)");
}

Result<std::unique_ptr<RangeReader>> RetryStore::open_with_retries(const std::string& key,
                                                                   uint64_t offset, uint64_t length,
                                                                   const IoContext& io,
                                                                   Failures& failures) {
  for (;;) {
    Result<std::unique_ptr<RangeReader>> opened = StoreLayer::open_range(key, offset, length, io);
    if (opened) return opened;
    LB_RETURN_IF_ERROR(
        before_retry(failures, opened.status(),
                     fmt::format("{}: read {} [{}, +{})", location(), key, offset, length), io));
  }
}

Result<ObjectInfo> RetryStore::stat_info(const std::string& key, const IoContext& io) {
  Failures failures;
  for (;;) {
    Result<ObjectInfo> info = StoreLayer::stat_info(key, io);
    if (info) return info;
    LB_RETURN_IF_ERROR(before_retry(failures, info.status(), location() + ": stat " + key, io));
  }
}

Result<std::unique_ptr<RangeReader>> RetryStore::open_range(const std::string& key, uint64_t offset,
                                                            uint64_t length, const IoContext& io) {
  Failures failures;
  Result<std::unique_ptr<RangeReader>> opened =
      open_with_retries(key, offset, length, io, failures);
  if (!opened) return opened.status();
  return std::unique_ptr<RangeReader>(
      new Reader(*this, key, offset, std::move(opened).value(), io, failures));
}

Status RetryStore::put(const std::string& key, std::span<const std::byte> data,
                       const IoContext& io) {
  // Objects are immutable, so storing the same bytes again is harmless.
  Failures failures;
  for (;;) {
    const Status status = StoreLayer::put(key, data, io);
    if (status.is_ok()) return status;
    LB_RETURN_IF_ERROR(before_retry(failures, status, location() + ": put " + key, io));
  }
}

Status RetryStore::remove(const std::string& key, const IoContext& io) {
  Failures failures;
  for (;;) {
    const Status status = StoreLayer::remove(key, io);
    if (status.is_ok()) return status;
    LB_RETURN_IF_ERROR(before_retry(failures, status, location() + ": remove " + key, io));
  }
}

std::string RetryStore::describe() const {
  return fmt::format("retry({}) over {}",
                     policy_.retries ? std::to_string(*policy_.retries) : "deadline",
                     StoreLayer::describe());
}

}  // namespace lazyblock
