// FirecrackerStandIn: a VM restored from a snapshot, as its UFFD handler sees
// it. It does what Firecracker does on snapshot/load with a UFFD memory
// backend: maps guest memory (anonymous, or 2 MiB hugetlbfs pages), creates
// a userfaultfd with the features Firecracker asks for (EVENT_REMOVE, and
// MISSING_HUGETLBFS for huge pages), registers every region for missing
// faults, connects to the handler's socket and sends the JSON region
// mappings with the descriptor in one message. Touching its memory then
// faults pages in through the handler; remove() is the balloon's
// MADV_DONTNEED (a REMOVE event).
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "common/mapped_region.h"
#include "common/status.h"
#include "common/unique_fd.h"

namespace lazyblock::testing {

struct StandInRegion {
  uint64_t size = 0;    // bytes, a multiple of the page size
  uint64_t offset = 0;  // where the region's bytes are in the memfile
  bool huge = false;    // 2 MiB hugetlbfs pages instead of 4 KiB ones
};

class FirecrackerStandIn {
 public:
  static Result<std::unique_ptr<FirecrackerStandIn>> restore(
      const std::filesystem::path& socket, const std::vector<StandInRegion>& regions);
  // The VM exits: closes its socket and descriptor, unmaps its memory.
  ~FirecrackerStandIn();
  FirecrackerStandIn(const FirecrackerStandIn&) = delete;
  FirecrackerStandIn& operator=(const FirecrackerStandIn&) = delete;

  std::byte* memory(size_t region) const { return maps_[region].data(); }
  uint64_t size(size_t region) const { return maps_[region].size(); }
  // The JSON Firecracker sent for these regions.
  const std::string& mappings() const { return mappings_; }
  // The balloon takes [offset, offset + length) of `region` back.
  Status remove(size_t region, uint64_t offset, uint64_t length);
  // Lets go of the userfaultfd, as an exiting Firecracker does: once the
  // handler has too, faults still waiting are woken and get zero pages.
  void close_userfaultfd();

 private:
  FirecrackerStandIn() = default;

  std::vector<MappedRegion> maps_;
  std::string mappings_;
  UniqueFd uffd_;
  UniqueFd socket_;
};

// Whether `pages` 2 MiB huge pages can be mapped here; as root, reserves
// them if the pool is smaller (the reservation is left for later tests).
bool reserve_huge_pages(int pages);

// Sends `body` in one message with descriptor `fd` (none if fd < 0)
// attached, as Firecracker sends its mappings and userfaultfd.
Status send_with_descriptor(int socket, std::string_view body, int fd);

}  // namespace lazyblock::testing
