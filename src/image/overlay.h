// image::Overlay: a writable disk over a read-only Device. Writes, trims and
// zeroes go to a local sparse file; reads merge it with the device; the
// stored objects are never modified.
//
// Data flow: one bit per device block says whether the block lives in the
// overlay file. Every write takes the locks of the blocks it touches (lock
// stripes, taken in one order), so writes to one block are atomic with
// respect to each other: a whole block goes straight to the file; part of a
// block not yet in the file is merged with the device's bytes in memory and
// written whole. A read takes each run of blocks from the overlay or from
// the device, without a lock: a bit is set only after its block's bytes are
// in the file, and never cleared. Zeroing whole blocks punches a hole.
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
#include "common/status.h"
#include "common/unique_fd.h"
#include "image/device.h"
#include "image/overlay_map.h"

namespace lazyblock::image {

class Overlay {
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
  ~Overlay();

  uint64_t size() const { return size_; }
  uint64_t block_size() const { return block_size_; }

  // Copies [offset, offset + buffer.size()) of the disk, clipped to its end.
  Result<size_t> read_at(std::span<std::byte> buffer, uint64_t offset);
  // Writes `data` at `offset`; the range must lie within the disk.
  // kNoSpace when the overlay's file system is full.
  Status write_at(std::span<const std::byte> data, uint64_t offset);
  // Makes [offset, offset + length) read as zeros (trim and write-zeroes).
  Status write_zeros(uint64_t offset, uint64_t length);
  // Makes every write completed before the call durable (see above).
  Status flush();

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
  static Result<Kept> open_kept(const std::filesystem::path& path,
                                const OverlayIdentity& expected);

 private:
  Overlay(Device& device, UniqueFd fd, std::unique_ptr<OverlayMap> map, uint64_t size,
          uint64_t block_size);

  // The lock stripes of blocks [first, last], taken in stripe order.
  class BlockLocks;
  std::mutex& stripe(uint64_t block) { return stripes_[block % stripes_.size()]; }
  // Writes part of block `index` (not in the file yet: its other bytes come
  // from the device). Requires the block's lock held.
  Status write_partial_locked(uint64_t index, uint64_t offset_in_block,
                              std::span<const std::byte> data);
  // One round of flushing: snapshot, sync the data, save the map.
  Status flush_round();

  Device& device_;
  const UniqueFd fd_;
  const std::unique_ptr<OverlayMap> map_;  // null for a temporary overlay
  const uint64_t size_;
  const uint64_t block_size_;
  AtomicBitmap present_;
  std::array<std::mutex, 64> stripes_;

  // Flush rounds: a caller needs a round that starts after it arrived.
  std::mutex flush_mu_;
  std::condition_variable flush_done_;
  uint64_t rounds_started_ = 0;    // guarded by flush_mu_
  uint64_t rounds_finished_ = 0;   // guarded by flush_mu_
  bool flushing_ = false;          // guarded by flush_mu_: a round runs
  Status last_round_;              // guarded by flush_mu_: how the last round ended
};

}  // namespace lazyblock::image
