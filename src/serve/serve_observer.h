// ServeObserver: what a frontend reports about each request it served, for
// whoever keeps metrics (the daemon). Optional: a server without one reports
// nothing. Called on the servers' own threads, many at once: implementations
// are thread-safe and cheap (counters, histograms), and never block.
#pragma once

#include <chrono>
#include <cstdint>

namespace lazyblock {

class ServeObserver {
 public:
  virtual ~ServeObserver() = default;

  // An NBD request of type `command` (NBD_CMD_READ, ...) was answered
  // `latency` after it was read off the socket.
  virtual void nbd_request(uint16_t command, std::chrono::nanoseconds latency) = 0;

  // A page fault was resolved: from the cache at once, after a fetch, or
  // with a zero page; `latency` from its being read off the userfaultfd.
  enum class FaultOutcome { kCached, kFetched, kZero };
  virtual void uffd_fault(FaultOutcome outcome, std::chrono::nanoseconds latency) = 0;
};

}  // namespace lazyblock
