#include "common/io_context.h"

namespace lazyblock {

Status IoContext::check(const std::string& what) const {
  if (stop.stop_requested()) return Status::cancelled(what + ": cancelled");
  if (Clock::now() >= deadline) return Status::timeout(what + ": deadline exceeded");
  return Status::ok();
}

Status IoContext::sleep_until(Clock::time_point until, const std::string& what) const {
  std::mutex mu;
  std::condition_variable_any cv;
  std::unique_lock lock(mu);
  const Clock::time_point wake = std::min(until, deadline);
  // Woken only by the stop request; the predicate is the stop itself.
  cv.wait_until(lock, stop, wake, [] { return false; });
  if (stop.stop_requested()) return Status::cancelled(what + ": cancelled");
  if (until > deadline) return Status::timeout(what + ": deadline exceeded");
  return Status::ok();
}

}  // namespace lazyblock
