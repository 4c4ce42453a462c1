// image::Overlay: a writable disk over a read-only Device. Writes, trims and
// zeroes go to a local sparse file; reads merge it with the device; the
// stored objects are never modified.
//
// Data flow: one bit per device block says whether the block lives in the
// overlay file. A write of whole blocks goes straight to the file; a write of
// part of a block first copies the block from the device (under that
// block's lock), so the overlay always holds whole blocks. A read takes each
// run of blocks from the overlay or from the device. A bit is set only after
// its block's bytes are in the file, and never cleared, so a reader that
// sees it sees the bytes. Zeroing whole blocks punches a hole.
//
// Kept overlays (`--overlay PATH`): the file is PATH, its block map
// PATH.map ("LBOVMAP1", u64 device size, u64 block size, then the bits),
// written on flush() and when the overlay closes. Opening an existing PATH
// resumes it (device size and block size must match); `pack --parent
// --overlay PATH` turns its blocks into the next generation.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "common/atomic_bitmap.h"
#include "common/status.h"
#include "image/device.h"

namespace lazyblock::image {

class Overlay {
 public:
  // An overlay of `device` in an unnamed file in `temp_dir` (gone when
  // closed), or kept at `path`.
  static Result<std::unique_ptr<Overlay>> open(Device& device,
                                               std::optional<std::filesystem::path> path,
                                               const std::filesystem::path& temp_dir = {});
  ~Overlay();

  uint64_t size() const { return size_; }
  uint64_t block_size() const { return block_size_; }

  // Copies [offset, offset + buffer.size()) of the disk, clipped to its end.
  Result<size_t> read_at(std::span<std::byte> buffer, uint64_t offset);
  // Writes `data` at `offset`; the range must lie within the disk.
  Status write_at(std::span<const std::byte> data, uint64_t offset);
  // Makes [offset, offset + length) read as zeros (trim and write-zeroes).
  Status write_zeros(uint64_t offset, uint64_t length);
  // Makes every completed write durable (and the block map, if kept).
  Status flush();

  // Whether block `index` lives in the overlay.
  bool has_block(uint64_t index) const { return present_.test(index); }
  uint64_t blocks() const { return present_.size(); }

  // The overlay of a kept overlay, as pack reads it: the file, opened
  // read-only, and its block map. `device_size`/`block_size` must match.
  struct Kept {
    int fd;
    std::vector<bool> present;
  };
  static Result<Kept> load_kept(const std::filesystem::path& path, uint64_t device_size,
                                uint64_t block_size);

 private:
  Overlay(Device& device, int fd, std::optional<std::filesystem::path> path, uint64_t size,
          uint64_t block_size);
  // Copies block `index` from the device into the file, if it is not there
  // yet. Requires the block's lock held.
  Status own_block_locked(uint64_t index);
  Status save_map() const;
  std::mutex& lock_for(uint64_t block) { return locks_[block % locks_.size()]; }

  Device& device_;
  const int fd_;
  const std::optional<std::filesystem::path> path_;
  const uint64_t size_;
  const uint64_t block_size_;
  AtomicBitmap present_;
  // Striped locks serialize the read-modify-write of partial blocks.
  std::array<std::mutex, 64> locks_;
};

}  // namespace lazyblock::image
