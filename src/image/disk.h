// image::Disk: a disk as every frontend (NBD, UFFD, export) sees it, read-only
// (a build's Device) or writable (an Overlay stacked on a Disk).
//
// The public methods are a non-virtual front that checks every range once,
// as nbdkit's backend.c does for its layers: reads are clipped to the end
// (and empty ones never reach the implementation), writes must lie within
// the disk, and a read-only disk refuses them. The private virtuals below
// see only non-empty ranges inside the disk.
//
// Views: view() and cached_view() give the bytes in place when they are
// contiguous (one extent of a build's data file, or zeros); a range that is
// not (it crosses extents, or lies in an overlay's file) has no view, which
// is not an error: read() copies it. A view of a cache is not checked
// against a cache file cut under it (its holes read as zeros): what goes
// out of the process, or into a VM, is copied with read() or read_cached().
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "common/byte_sink.h"
#include "common/status.h"

namespace lazyblock::image {

// A run of the disk as block status reports it: bytes stored somewhere, or
// a hole that reads as zeros and needs no fetch (a zero mapping, a trimmed
// overlay block).
struct DiskExtent {
  enum class Kind { kData, kZero };
  uint64_t offset = 0;
  uint64_t length = 0;
  Kind kind = Kind::kData;
  friend bool operator==(const DiskExtent&, const DiskExtent&) = default;
};

class Disk {
 public:
  virtual ~Disk() = default;
  Disk(const Disk&) = delete;
  Disk& operator=(const Disk&) = delete;

  uint64_t size() const { return size_; }
  uint64_t block_size() const { return block_size_; }
  bool writable() const { return writable_; }

  // Copies [offset, offset + buffer.size()) clipped to the end into
  // `buffer`; returns the count copied.
  Result<size_t> read(std::span<std::byte> buffer, uint64_t offset);
  // The bytes of [offset, offset + length) clipped to the end, in place and
  // valid for the disk's lifetime, waiting for a fetch if need be; nullopt
  // if they are not contiguous (see above).
  Result<std::optional<std::span<const std::byte>>> view(uint64_t offset, uint64_t length);
  // The view if it exists and its bytes are here now, else nullopt: never
  // waits, never fetches, takes no lock (a page fault's fast path).
  std::optional<std::span<const std::byte>> cached_view(uint64_t offset, uint64_t length);
  // Copies [offset, offset + buffer.size()) into `buffer` if it lies within
  // the disk and every byte is here now (zeros, or cached and read back
  // with no drop of its cache meanwhile); false otherwise. Never fetches,
  // takes no lock: a page fault's fast path, whose bytes go into a VM and
  // cannot be taken back (a view of a cache file cut short under it may
  // read as zeros; this copy is checked for that).
  bool read_cached(std::span<std::byte> buffer, uint64_t offset);
  // Whether every byte of the range (clipped) is known to read as zeros
  // without a fetch. Takes no lock.
  bool is_zero(uint64_t offset, uint64_t length);
  // Starts fetching the range (clipped) without waiting; failures surface
  // to whoever reads those bytes.
  void prefetch(uint64_t offset, uint64_t length);
  // The range (clipped) as consecutive extents, in order, covering it whole.
  // Neighbours may be of one kind (each stored piece is its own extent).
  Result<std::vector<DiskExtent>> extents(uint64_t offset, uint64_t length);
  // Writes the whole disk to `sink` in order, zero extents as write_zeros,
  // asking for the bytes ahead of the writer as it goes; each piece is
  // copied with read() first.
  Status write_to(ByteSink& sink);

  // A writable disk only (kInvalidArgument otherwise, or for a range that
  // does not lie within the disk). kNoSpace when the disk's storage is full.
  Status write(std::span<const std::byte> data, uint64_t offset);
  Status write_zeroes(uint64_t offset, uint64_t length);
  // The range's bytes are no longer needed: they read as zeros afterwards.
  Status trim(uint64_t offset, uint64_t length);
  // Makes every write completed before the call durable. OK on a read-only disk.
  Status flush();

  // How a sequential reader (write_to) reads: pieces of at most `piece`
  // bytes, with the next `window` bytes asked for ahead of it.
  struct Readahead {
    uint64_t piece;
    uint64_t window;
  };
  virtual Readahead readahead() const = 0;

 protected:
  Disk(uint64_t size, uint64_t block_size, bool writable)
      : size_(size), block_size_(block_size), writable_(writable) {}

 private:
  // The implementations, with 0 < length and offset + length <= size().
  virtual Status do_read(std::span<std::byte> buffer, uint64_t offset) = 0;
  virtual Result<std::optional<std::span<const std::byte>>> do_view(uint64_t offset,
                                                                    uint64_t length) = 0;
  virtual std::optional<std::span<const std::byte>> do_cached_view(uint64_t offset,
                                                                   uint64_t length) = 0;
  virtual bool do_read_cached(std::span<std::byte> buffer, uint64_t offset) = 0;
  virtual bool do_is_zero(uint64_t offset, uint64_t length) = 0;
  virtual void do_prefetch(uint64_t offset, uint64_t length) = 0;
  // Appends the extents of the range to `out`.
  virtual Status do_extents(uint64_t offset, uint64_t length, std::vector<DiskExtent>& out) = 0;
  // Writable disks override these; a read-only disk never sees them called.
  virtual Status do_write(std::span<const std::byte> data, uint64_t offset);
  virtual Status do_write_zeroes(uint64_t offset, uint64_t length);
  virtual Status do_trim(uint64_t offset, uint64_t length);
  virtual Status do_flush();

  const uint64_t size_;
  const uint64_t block_size_;
  const bool writable_;
};

}  // namespace lazyblock::image
