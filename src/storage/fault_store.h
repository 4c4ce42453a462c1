// FaultStore: a layer that breaks the store it wraps in the ways remote
// storage breaks, for tests (and `--faults` on the command line).
//
// The faults in force are a FaultSpec that tests may change at any time with
// set(); a stream takes the spec in force when it is opened. Faults:
//   fail-open         open_range fails (kUnavailable, "injected fault").
//   fail-after=N      a stream fails (kUnavailable) once it has delivered N bytes.
//   stall-after=N     a stream stops delivering once it has delivered N bytes,
//                     until its deadline or stop, or until release_stalls().
//   short=N           the object's data ends at offset N although its reported
//                     size is unchanged: streams end early, cleanly, as a
//                     truncated HTTP body does.
//   size=N            stat() and object_size() report N instead of the real size.
//   times=N           the faults above hit only the first N calls (streams
//                     opened, stats) after the spec is set; later ones run
//                     clean, as with a flaky link (for retry tests).
// Spec text: comma-separated, e.g. "fail-after=1048576" or "short=100,size=200";
// "" or "none" for no faults.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "common/mutex.h"
#include "storage/object_store.h"

namespace lazyblock {

struct FaultSpec {
  bool fail_open = false;
  std::optional<uint64_t> fail_after;
  std::optional<uint64_t> stall_after;
  std::optional<uint64_t> short_object;
  std::optional<uint64_t> reported_size;
  std::optional<uint64_t> times;

  static Result<FaultSpec> parse(std::string_view text);
  std::string to_string() const;
};

class FaultStore final : public StoreLayer {
 public:
  FaultStore(std::shared_ptr<ObjectStore> inner, FaultSpec spec = {});

  // Replaces the faults in force for streams opened from now on.
  void set(FaultSpec spec);
  // Lets every stream that is stalled now, or stalls later under the spec it
  // was opened with, go on delivering.
  void release_stalls();
  // Blocks until at least `count` streams have reached their stall point
  // (counted since construction): lets a test act at a known point of a fetch.
  void wait_for_stalls(int count);

  // How many open_range calls reached this layer (including failed ones).
  int opens() const;

  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;
  std::string describe() const override;

 private:
  class Reader;

  // The spec a new stream or stat call gets: the one in force, or none once
  // `times` calls have had it.
  FaultSpec spec_for_call();
  // Holds a stream at its stall point until release_stalls(), its deadline
  // (kTimeout) or its stop (kCancelled).
  Status stall(const IoContext& io, const std::string& key);

  mutable Mutex mu_;
  StoppableCondVar cv_;
  FaultSpec spec_ GUARDED_BY(mu_);
  bool stalls_released_ GUARDED_BY(mu_) = false;
  int stalls_reached_ GUARDED_BY(mu_) = 0;
  int opens_ GUARDED_BY(mu_) = 0;
  uint64_t faulted_calls_ GUARDED_BY(mu_) = 0;  // calls under spec_ so far
};

}  // namespace lazyblock
