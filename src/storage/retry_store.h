// RetryStore: a layer that retries what fails for a passing reason.
//
// Transient failures (kUnavailable: a connection reset, a 5xx, 429 or 503
// SlowDown, a stalled or truncated response) are retried after a capped
// exponential backoff with full jitter, so that many clients failing at once
// do not retry in step. Anything else (kNotFound, kOutOfRange, kCorruption,
// an authorization error, the deadline, a stop) fails at once.
//
// How long: by default for as long as the call's deadline (the fetch
// deadline, `--timeout`) leaves time for another attempt, so an upstream
// that is down for a few seconds costs a few seconds, not the read; a call
// without a deadline gets `window_without_deadline` from its first failure.
// `retries`, if set, also bounds the attempts after a failure with no byte
// delivered in between, so a long stream over a flaky link can survive many
// failures as long as each attempt makes progress. Each retry is logged at
// info; the failure that ends the retries is returned once, saying how many
// retries it ended, and logged by no one here.
//
// A stream that fails, or ends before the length it promised, is resumed
// from the first byte it did not deliver, with a new range request; the
// reader's caller sees one unbroken stream. The object must keep its size
// and version across attempts (objects are immutable): a change is
// kCorruption. Every wait honours the IoContext.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "storage/object_store.h"

namespace lazyblock {

struct RetryPolicy {
  // Attempts after a failure, per call or per stream without progress;
  // nullopt: as many as the deadline leaves time for (`--retry deadline`).
  std::optional<int> retries;
  std::chrono::nanoseconds base_delay = std::chrono::milliseconds(50);
  std::chrono::nanoseconds max_delay = std::chrono::seconds(2);
  // No retry starts with less than this left before the deadline: it could
  // only time out, and its timeout would hide the failure it replaced.
  std::chrono::nanoseconds attempt_reserve = std::chrono::milliseconds(100);
  // How long a call without a deadline keeps retrying after its first
  // failure in a row.
  std::chrono::nanoseconds window_without_deadline = std::chrono::seconds(60);
};

// Whether a failure is worth another attempt.
bool is_transient(const Status& status);

class RetryStore final : public StoreLayer {
 public:
  RetryStore(std::shared_ptr<ObjectStore> inner, RetryPolicy policy);

  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;
  Status put(const std::string& key, std::span<const std::byte> data, const IoContext& io) override;
  Status remove(const std::string& key, const IoContext& io) override;
  std::string describe() const override;

  // Attempts made after a failure, since construction (for tests and metrics).
  uint64_t retries() const { return retries_.load(std::memory_order_relaxed); }

 private:
  class Reader;

  // Failures in a row of one call or stream, with no progress in between.
  struct Failures {
    int count = 0;
    Clock::time_point first;  // when the first of them came
  };

  // After one more failure of `what`: kept (OK, having slept the backoff) if
  // the failure is transient and the policy and deadline leave room for
  // another attempt, else the failure itself (saying how many retries it
  // ends), or kTimeout/kCancelled if the deadline or a stop came during the
  // backoff.
  Status before_retry(Failures& failures, const Status& failure, const std::string& what,
                      const IoContext& io);
  // Opens [offset, offset + length) of `key`, retrying transient failures.
  Result<std::unique_ptr<RangeReader>> open_with_retries(const std::string& key, uint64_t offset,
                                                         uint64_t length, const IoContext& io,
                                                         Failures& failures);

  const RetryPolicy policy_;
  std::atomic<uint64_t> retries_{0};
};

}  // namespace lazyblock
