// SimulateStore: a layer that makes any store behave like a remote object
// store with a given time to first byte and per-stream bandwidth.
//
// Timing model (E2B's benchmark upstream): open_range returns after `ttfb`;
// from then on the first n bytes of the stream are available n / bandwidth
// seconds later, measured cumulatively from the first byte, so the block at
// offset o of a stream is complete at ttfb + (o + block) / bandwidth. Each
// stream is paced on its own (no shared link). read() waits until
// min(buffer, 16 KiB, rest of range) bytes are due, then returns all that are
// due (up to the buffer), as a socket would. stat() costs one ttfb.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <string_view>

#include "storage/object_store.h"

namespace lazyblock {

struct SimulateProfile {
  std::chrono::nanoseconds ttfb{0};
  double bytes_per_second = 0;  // > 0

  // "gcs" (20 ms, 100 MB/s), "nfs" (1 ms, 500 MB/s), or "ttfb=20ms,bw=100MB/s"
  // (also "ttfb=20,bw=100": milliseconds and MB/s). MB = 10^6 bytes.
  static Result<SimulateProfile> parse(std::string_view text);
  // "ttfb=20ms,bw=100MB/s"
  std::string to_string() const;
};

class SimulateStore final : public StoreLayer {
 public:
  SimulateStore(std::shared_ptr<ObjectStore> inner, SimulateProfile profile);

  const SimulateProfile& profile() const { return profile_; }

  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;
  std::string describe() const override;

 private:
  const SimulateProfile profile_;
};

}  // namespace lazyblock
