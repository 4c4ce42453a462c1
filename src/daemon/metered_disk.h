// MeteredDisk: a disk's NBD export as the daemon serves it, counting each
// read that reaches it as served from the cache (every block of it already
// local: in the VM's overlay, cached, or a zero range) or waited (some
// block still had to be fetched). Everything else forwards to the disk
// below (the VM's Overlay, or the template's Device for a read-only disk).
//
// The check is made just before the read, block by block, with the disk's
// lock-free probes (is_zero, cached_view, the overlay's bitmap): a block
// that another reader's fetch brings in between the check and the read
// counts as waited, which it nearly was.
#pragma once

#include <atomic>
#include <cstdint>

#include "image/disk.h"
#include "image/overlay.h"

namespace lazyblock::daemon {

// Where MeteredDisk reports its reads (thread-safe).
class BlockReadObserver {
 public:
  virtual ~BlockReadObserver() = default;
  virtual void block_read(bool waited) = 0;
};

class MeteredDisk final : public image::Disk {
 public:
  // `overlay` is `disk` when it is the VM's overlay, else null; `observer`
  // outlives this.
  MeteredDisk(image::Disk& disk, const image::Overlay* overlay, BlockReadObserver& observer);

  Readahead readahead() const override { return disk_.readahead(); }

  uint64_t reads_cached() const { return cached_.load(std::memory_order_relaxed); }
  uint64_t reads_waited() const { return waited_.load(std::memory_order_relaxed); }

 private:
  // Counts the read of [offset, offset + length).
  void count(uint64_t offset, uint64_t length);
  bool local(uint64_t offset, uint64_t length);

  Status do_read(std::span<std::byte> buffer, uint64_t offset) override;
  Result<std::optional<std::span<const std::byte>>> do_view(uint64_t offset,
                                                            uint64_t length) override;
  std::optional<std::span<const std::byte>> do_cached_view(uint64_t offset,
                                                           uint64_t length) override {
    return disk_.cached_view(offset, length);
  }
  bool do_read_cached(std::span<std::byte> buffer, uint64_t offset) override {
    return disk_.read_cached(buffer, offset);
  }
  bool do_is_zero(uint64_t offset, uint64_t length) override {
    return disk_.is_zero(offset, length);
  }
  void do_prefetch(uint64_t offset, uint64_t length) override { disk_.prefetch(offset, length); }
  Status do_extents(uint64_t offset, uint64_t length, std::vector<image::DiskExtent>& out) override;
  Status do_write(std::span<const std::byte> data, uint64_t offset) override {
    return disk_.write(data, offset);
  }
  Status do_write_zeroes(uint64_t offset, uint64_t length) override {
    return disk_.write_zeroes(offset, length);
  }
  Status do_trim(uint64_t offset, uint64_t length) override { return disk_.trim(offset, length); }
  Status do_flush() override { return disk_.flush(); }

  image::Disk& disk_;
  const image::Overlay* const overlay_;
  BlockReadObserver& observer_;
  std::atomic<uint64_t> cached_{0}, waited_{0};
};

}  // namespace lazyblock::daemon
