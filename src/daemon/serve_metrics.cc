#include "daemon/serve_metrics.h"

#include <string>

namespace lazyblock::daemon {

std::string_view ServeMetrics::command_label(size_t command) {
  static constexpr std::array<std::string_view, kCommands> kLabels = {
      "read", "write", "disc", "flush", "trim", "cache", "write_zeroes", "block_status", "other"};
  return kLabels[command];
}

void ServeMetrics::nbd_request(uint16_t command, std::chrono::nanoseconds latency) {
  const size_t index = std::min<size_t>(command, kCommands - 1);
  nbd_requests_[index].fetch_add(1, std::memory_order_relaxed);
  nbd_latency_[index].observe(latency);
}

void ServeMetrics::uffd_fault(FaultOutcome outcome, std::chrono::nanoseconds latency) {
  const size_t index = static_cast<size_t>(outcome);
  faults_[index].fetch_add(1, std::memory_order_relaxed);
  fault_latency_[index].observe(latency);
}

void ServeMetrics::block_read(bool waited) {
  block_reads_[waited ? 1 : 0].fetch_add(1, std::memory_order_relaxed);
}

void ServeMetrics::render(MetricsText& out) const {
  out.family("lazyblock_block_reads_total", "counter",
             "Disk reads over NBD, by how they were served (cached: every block already "
             "local, in the cache, the VM's overlay or a zero range; waited: on a fetch)");
  out.sample("lazyblock_block_reads_total", {{"served", "cached"}},
             static_cast<double>(block_reads_[0].load(std::memory_order_relaxed)));
  out.sample("lazyblock_block_reads_total", {{"served", "waited"}},
             static_cast<double>(block_reads_[1].load(std::memory_order_relaxed)));
  out.family("lazyblock_nbd_requests_total", "counter", "NBD requests answered, by command");
  for (size_t i = 0; i < kCommands; ++i) {
    out.sample("lazyblock_nbd_requests_total", {{"command", std::string(command_label(i))}},
               static_cast<double>(nbd_requests_[i].load(std::memory_order_relaxed)));
  }
  out.family("lazyblock_nbd_request_seconds", "histogram",
             "Time from reading an NBD request to its answer, by command");
  for (size_t i = 0; i < kCommands; ++i) {
    out.histogram("lazyblock_nbd_request_seconds", {{"command", std::string(command_label(i))}},
                  nbd_latency_[i].snapshot());
  }
  static constexpr std::array<const char*, 3> kOutcomes = {"cached", "fetched", "zero"};
  out.family("lazyblock_uffd_faults_total", "counter",
             "Page faults resolved, by outcome (cached: at once from the cache, which is a block "
             "read served from cache; fetched: after waiting on a fetch; zero: a zero page)");
  for (size_t i = 0; i < kOutcomes.size(); ++i) {
    out.sample("lazyblock_uffd_faults_total", {{"outcome", kOutcomes[i]}},
               static_cast<double>(faults_[i].load(std::memory_order_relaxed)));
  }
  out.family("lazyblock_uffd_fault_seconds", "histogram",
             "Time from reading a page fault to its page installed, by outcome");
  for (size_t i = 0; i < kOutcomes.size(); ++i) {
    out.histogram("lazyblock_uffd_fault_seconds", {{"outcome", kOutcomes[i]}},
                  fault_latency_[i].snapshot());
  }
}

}  // namespace lazyblock::daemon
