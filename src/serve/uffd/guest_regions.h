// Guest memory regions as Firecracker describes them to its UFFD handler: a
// JSON array of {base_host_virt_addr, size, offset, page_size,
// page_size_kib}, one per region of guest memory, where `offset` is where
// the region's bytes start in the memory snapshot (our memfile device) and
// the page size is 4 KiB, or 2 MiB for hugetlbfs-backed regions.
// (`page_size_kib` is in bytes despite its name; older Firecracker versions
// send only it.)
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace lazyblock::uffd {

struct GuestRegion {
  uint64_t base = 0;       // first host virtual address of the region
  uint64_t size = 0;       // bytes
  uint64_t offset = 0;     // where the region starts in the memfile
  uint64_t page_size = 0;  // 4096 or 2 MiB

  uint64_t end() const { return base + size; }
  bool huge() const { return page_size > 4096; }
};

// The regions of `json`, sorted by address, checked against a memfile of
// `memfile_size` bytes: sizes, addresses and offsets aligned to a supported
// page size, no overlaps, every region inside the memfile. kInvalidArgument
// naming the fault otherwise.
Result<std::vector<GuestRegion>> parse_guest_regions(std::string_view json, uint64_t memfile_size);

// The region holding `address`, or nullptr. `regions` sorted by address.
const GuestRegion* region_at(const std::vector<GuestRegion>& regions, uint64_t address);

// The region holding memfile byte `offset`, or nullptr.
const GuestRegion* region_of_offset(const std::vector<GuestRegion>& regions, uint64_t offset);

}  // namespace lazyblock::uffd
