// ServeMetrics: the daemon's ServeObserver: NBD requests and page faults
// counted and timed, by command and by outcome, and disks' reads as served
// from cache or waited, for /metrics. Shared by
// every device's server, so its totals never go down as devices end.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <string_view>

#include "daemon/metered_disk.h"
#include "daemon/metrics.h"
#include "serve/serve_observer.h"

namespace lazyblock::daemon {

class ServeMetrics : public ServeObserver, public BlockReadObserver {
 public:
  void nbd_request(uint16_t command, std::chrono::nanoseconds latency) override;
  void uffd_fault(FaultOutcome outcome, std::chrono::nanoseconds latency) override;
  // A disk's read (an NBD read, as MeteredDisk sees it) was served from
  // what is local, or waited on a fetch.
  void block_read(bool waited) override;

  // Appends its families to `out`.
  void render(MetricsText& out) const;

 private:
  // NBD_CMD_READ (0) .. NBD_CMD_BLOCK_STATUS (7), then every other type.
  static constexpr size_t kCommands = 9;
  static std::string_view command_label(size_t command);
  std::array<std::atomic<uint64_t>, kCommands> nbd_requests_{};
  std::array<Histogram, kCommands> nbd_latency_;
  std::array<std::atomic<uint64_t>, 3> faults_{};  // by FaultOutcome
  std::array<Histogram, 3> fault_latency_;
  std::array<std::atomic<uint64_t>, 2> block_reads_{};  // cached, waited
};

}  // namespace lazyblock::daemon
