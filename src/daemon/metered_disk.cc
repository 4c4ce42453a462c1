#include "daemon/metered_disk.h"

#include <algorithm>

namespace lazyblock::daemon {

MeteredDisk::MeteredDisk(image::Disk& disk, const image::Overlay* overlay,
                         BlockReadObserver& observer)
    : Disk(disk.size(), disk.block_size(), disk.writable()),
      disk_(disk),
      overlay_(overlay),
      observer_(observer) {}

bool MeteredDisk::local(uint64_t offset, uint64_t length) {
  const uint64_t block_size = this->block_size();
  const uint64_t end = offset + length;
  for (uint64_t block = offset / block_size; block * block_size < end; ++block) {
    if (overlay_ != nullptr && overlay_->has_block(block)) continue;
    const uint64_t from = std::max(offset, block * block_size);
    const uint64_t to = std::min(end, (block + 1) * block_size);
    if (disk_.is_zero(from, to - from)) continue;
    if (!disk_.cached_view(from, to - from)) return false;
  }
  return true;
}

void MeteredDisk::count(uint64_t offset, uint64_t length) {
  const bool waited = !local(offset, length);
  (waited ? waited_ : cached_).fetch_add(1, std::memory_order_relaxed);
  observer_.block_read(waited);
}

Status MeteredDisk::do_read(std::span<std::byte> buffer, uint64_t offset) {
  count(offset, buffer.size());
  Result<size_t> got = disk_.read(buffer, offset);
  if (!got) return got.status();
  return Status::ok();
}

Result<std::optional<std::span<const std::byte>>> MeteredDisk::do_view(uint64_t offset,
                                                                       uint64_t length) {
  count(offset, length);
  return disk_.view(offset, length);
}

Status MeteredDisk::do_extents(uint64_t offset, uint64_t length,
                               std::vector<image::DiskExtent>& out) {
  Result<std::vector<image::DiskExtent>> extents = disk_.extents(offset, length);
  if (!extents) return extents.status();
  out.insert(out.end(), extents->begin(), extents->end());
  return Status::ok();
}

}  // namespace lazyblock::daemon
