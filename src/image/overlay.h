// image::Overlay: a writable Disk (disk.h) stacked on a read-only one (a
// build's Device). Writes, trims and zeroes go to a local sparse file; reads
// merge it with the device; the stored objects are never modified.
//
// Data flow: one bit per device block says whether the block lives in the
// overlay file. Every write takes the locks of the blocks it touches (lock
// stripes, taken in one order), so writes to one block are atomic with
// respect to each other: a whole block goes straight to the file; part of a
// block not yet in the file is merged with the device's bytes in memory and
// written whole. A read takes each run of blocks from the overlay or from
// the device, without a lock: a bit is set only after its block's bytes are
// in the file, and never cleared. Zeroing whole blocks punches a hole,
// which extents() reports as a zero extent (the file's holes, by SEEK_HOLE).
//
// Kept overlays (`--overlay PATH`): the data file is PATH, its block map
// PATH.map (overlay_map.h), which records the device the overlay belongs
// to and is locked while served. flush() makes every write completed before
// it durable: the map's bits are snapshot, the data file synced, then the
// map saved (one sync of its own); concurrent flushes coalesce behind one
// writer, so a flush that arrives while one is being written waits for the
// next round, which covers it, and none fails unless the disk does. A
// temporary overlay (no PATH) dies with the process, so its flush syncs
// nothing.
#pragma once

#include <array>
#include <condition_variable>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "common/atomic_bitmap.h"
#include "common/mutex.h"
#include "common/status.h"
#include "common/unique_fd.h"
#include "image/device.h"
#include "image/overlay_map.h"

namespace lazyblock::image {

class Overlay final : public Disk {
 public:
  // An overlay of `device` in an unnamed file in `temp_dir` (gone when
  // closed), or kept at `path`: created there if PATH does not exist,
  // resumed if it is an overlay of this very device, refused otherwise
  // (another device, a data file missing or shorter than the map says,
  // another process serving it).
  static Result<std::unique_ptr<Overlay>> open(Device& device,
                                               std::optional<std::filesystem::path> path,
                                               const std::filesystem::path& temp_dir = {});
  // Flushes a kept overlay.
  ~Overlay() override;

  Readahead readahead() const override;

  // Whether block `index` lives in the overlay.
  bool has_block(uint64_t index) const { return present_.test(index); }
  uint64_t blocks() const { return present_.size(); }

  // A kept overlay as pack reads it: its data file, opened read-only, and
  // the blocks its map lists, both as of its last flush. Refused while a
  // server holds it, or if it belongs to another device than `expected`.
  struct Kept {
    UniqueFd fd;
    std::vector<bool> present;
    std::unique_ptr<OverlayMap> map;  // holds the shared lock while read
  };
  static Result<Kept> open_kept(const std::filesystem::path& path, const OverlayIdentity& expected);

 private:
  Overlay(Disk& device, UniqueFd fd, std::unique_ptr<OverlayMap> map);

  // Reads of blocks not in the file go to the device; a range lies in runs
  // of blocks wholly in the file or wholly not.
  Status do_read(std::span<std::byte> buffer, uint64_t offset) override;
  Result<std::optional<std::span<const std::byte>>> do_view(uint64_t offset,
                                                            uint64_t length) override;
  std::optional<std::span<const std::byte>> do_cached_view(uint64_t offset,
                                                           uint64_t length) override;
  bool do_read_cached(std::span<std::byte> buffer, uint64_t offset) override;
  bool do_is_zero(uint64_t offset, uint64_t length) override;
  void do_prefetch(uint64_t offset, uint64_t length) override;
  Status do_extents(uint64_t offset, uint64_t length, std::vector<DiskExtent>& out) override;
  Status do_write(std::span<const std::byte> data, uint64_t offset) override;
  // Trim and write-zeroes alike make the range read as zeros.
  Status do_write_zeroes(uint64_t offset, uint64_t length) override;
  Status do_trim(uint64_t offset, uint64_t length) override;
  Status do_flush() override;
  // Whether [offset, offset + length) lies wholly outside the file's blocks.
  bool all_on_device(uint64_t offset, uint64_t length) const;
  // Appends the extents of [offset, end), wholly in the file: its holes are zeros.
  Status file_extents(uint64_t offset, uint64_t end, std::vector<DiskExtent>& out) const;

  // The lock stripes of blocks [first, last], taken in stripe order.
  class BlockLocks;
  std::mutex& stripe(uint64_t block) { return stripes_[block % stripes_.size()]; }
  // Writes part of block `index` (not in the file yet: its other bytes come
  // from the device). Requires the block's lock held.
  Status write_partial_locked(uint64_t index, uint64_t offset_in_block,
                              std::span<const std::byte> data);
  // One round of flushing: snapshot, sync the data, save the map.
  Status flush_round();

  Disk& device_;
  const UniqueFd fd_;
  const std::unique_ptr<OverlayMap> map_;  // null for a temporary overlay
  AtomicBitmap present_;
  std::array<std::mutex, 64> stripes_;

  // Flush rounds: a caller needs a round that starts after it arrived.
  Mutex flush_mu_;
  CondVar flush_done_;
  uint64_t rounds_started_ GUARDED_BY(flush_mu_) = 0;
  uint64_t rounds_finished_ GUARDED_BY(flush_mu_) = 0;
  bool flushing_ GUARDED_BY(flush_mu_) = false;  // a round runs
  Status last_round_ GUARDED_BY(flush_mu_);      // how the last round ended
};

}  // namespace lazyblock::image
