// image::OverlayMap: the durable block map of a kept overlay (PATH.map
// beside the overlay's data file PATH), and the identity that ties the
// overlay to the device it changes.
//
// What it promises: save() replaces the map so that a kill -9 or a power
// cut at any moment leaves either the previous saved map or the new one,
// never a mix and never an unreadable file. Why two slots: the map file
// holds two copies (slots) of the map, each with a sequence number and
// checksums; save() overwrites the older slot in place and syncs the file
// once, and open() takes the valid slot with the higher sequence. That costs
// one sync per save (a temp file renamed into place costs three: the file,
// the rename's directory, and the data before them), and writes only the
// 4 KiB pages of the bitmap that differ from what that slot held, so a flush
// of a large disk writes little. The file is created whole (allocated, not
// sparse), so a save never needs new space on a full disk.
//
// Layout (little-endian), two slots of equal size, slot k at k * slot_bytes:
//   header page, 4096 bytes:
//     0  u8[8]  magic "LBOVMAP2"
//     8  u64    sequence (the saves so far; the higher valid slot wins)
//     16 u8[16] build id of the device the overlay changes
//     32 u64    device size        40 u64 block size
//     48 u64    data file size (the least the data file PATH must hold)
//     56 u64    bitmap bytes       64 u64 XXH3-64 of the bitmap bytes
//     72 u16    device name length, then the name (at most 255 bytes)
//     4088 u64  XXH3-64 of header bytes [0, 4088)
//   bitmap, bitmap bytes rounded up to 4096: one bit per device block, bit i
//     is bit i % 64 of the 64-bit word i / 64; set: the block is in PATH.
//
// Ownership: a map opened for writing holds an exclusive open-file-
// description lock on PATH.map for as long as it is open, a map opened for
// reading a shared one; a second writer, or a reader while a writer serves
// it, is refused ("in use"), as qemu refuses an image another qemu holds.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "common/unique_fd.h"
#include "image/header.h"

namespace lazyblock::image {

// What a kept overlay belongs to: the device it changes.
struct OverlayIdentity {
  Uuid build;
  std::string name;
  uint64_t device_size = 0;
  uint64_t block_size = 0;

  // "rootfs.ext4 of build B (N bytes, blocks of 4096)"
  std::string to_string() const;
  friend bool operator==(const OverlayIdentity&, const OverlayIdentity&) = default;
};

class OverlayMap {
 public:
  enum class Access { kWrite, kRead };

  // The map file of the overlay whose data file is `overlay`.
  static std::filesystem::path path_for(const std::filesystem::path& overlay);

  // Creates the map of a new, empty overlay (durably, with its directory
  // entry), locked for writing. kAlreadyExists if a map is there.
  static Result<std::unique_ptr<OverlayMap>> create(const std::filesystem::path& overlay,
                                                    const OverlayIdentity& identity,
                                                    uint64_t data_file_size);

  // Opens the map of an existing overlay, locked for `access`. Refused
  // (kInvalidArgument, both identities in the message) if it belongs to
  // another device; kAlreadyExists if another process holds the lock;
  // kCorruption if neither slot verifies.
  static Result<std::unique_ptr<OverlayMap>> open(const std::filesystem::path& overlay,
                                                  const OverlayIdentity& expected, Access access);

  const OverlayIdentity& identity() const { return identity_; }
  // The size the data file had when the map was last saved.
  uint64_t data_file_size() const { return slots_[current_].data_file_size; }
  // The bitmap as last saved (or loaded): AtomicBitmap::words() form.
  const std::vector<uint64_t>& words() const { return slots_[current_].words; }

  // Durably replaces the map with `words`. One caller at a time. On failure
  // the previous map stays what open() would find.
  Status save(const std::vector<uint64_t>& words, uint64_t data_file_size);

 private:
  struct Slot {
    uint64_t sequence = 0;        // 0: never written, or does not verify
    std::vector<uint64_t> words;  // its bitmap
    bool known = false;           // whether `words` is what the disk holds
    uint64_t data_file_size = 0;
  };

  OverlayMap(UniqueFd fd, std::filesystem::path path, OverlayIdentity identity);
  uint64_t bitmap_bytes() const;
  uint64_t slot_bytes() const;
  Status write_slot(int slot, const Slot& contents);
  // Reads slot `slot`; a slot that does not verify comes back with sequence 0.
  Result<Slot> read_slot(int slot, const OverlayIdentity& expected) const;

  UniqueFd fd_;
  const std::filesystem::path path_;
  const OverlayIdentity identity_;
  Slot slots_[2];
  int current_ = 0;  // the slot last saved or loaded
};

}  // namespace lazyblock::image
