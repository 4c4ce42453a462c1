// IoContext: the deadline and the stop signal that every blocking call below
// a fetch honours.
//
// A fetch owns one IoContext. Store layers that wait (a simulated first byte,
// an injected stall, a network read) wait until the event, the deadline or a
// stop request, whichever comes first, and report kTimeout or kCancelled. A
// single caller giving up never stops a fetch others share: only the fetch's
// owner holds the stop_source.
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <stop_token>
#include <string>

#include "common/status.h"

namespace lazyblock {

using Clock = std::chrono::steady_clock;

struct IoContext {
  Clock::time_point deadline = Clock::time_point::max();
  std::stop_token stop;

  // kTimeout or kCancelled if the work should end now, else OK. `what`
  // names the operation for the message.
  Status check(const std::string& what) const;

  // Sleeps until `until`; returns early with kTimeout if the deadline comes
  // first, or kCancelled on a stop request.
  Status sleep_until(Clock::time_point until, const std::string& what) const;
};

}  // namespace lazyblock
