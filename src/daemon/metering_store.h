// MeteringStore: a store layer that counts what passes through it (calls,
// bytes, errors by kind, time to first byte) for the daemon's /metrics.
// It changes nothing it forwards, but one thing: a call that comes without
// a stop signal of its own (a header or page record read by whoever loads a
// template; a chunker's fetches have theirs) gets the layer's, so that
// cancel() ends it at a shutdown instead of letting it wait on a stalled
// store until its deadline.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <stop_token>

#include "daemon/metrics.h"
#include "storage/object_store.h"

namespace lazyblock::daemon {

struct StoreMetrics {
  std::atomic<uint64_t> range_requests{0};                   // open_range calls
  std::atomic<uint64_t> stat_requests{0};                    // stat / stat_info calls
  std::atomic<uint64_t> bytes{0};                            // bytes read from range streams
  std::array<std::atomic<uint64_t>, kStatusCodes> errors{};  // failed calls and reads, by code
  Histogram first_byte;  // from open_range's call to a stream's first byte
};

class MeteringStore : public StoreLayer {
 public:
  // `metrics` outlives the store and every reader it opens.
  MeteringStore(std::shared_ptr<ObjectStore> inner, StoreMetrics& metrics)
      : StoreLayer(std::move(inner)), metrics_(metrics) {}

  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;

  // Stops every call made without a stop signal, in progress or later
  // (kCancelled). Thread-safe; cannot be undone.
  void cancel() { stop_.request_stop(); }

 private:
  // `io`, or `io` with the layer's stop signal if it has none.
  IoContext with_stop(const IoContext& io) const {
    return io.stop.stop_possible() ? io : IoContext{io.deadline, stop_.get_token()};
  }

  StoreMetrics& metrics_;
  std::stop_source stop_;
};

}  // namespace lazyblock::daemon
