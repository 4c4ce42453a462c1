// BlockCache: the local copy of one object, filled block by block as fetches
// arrive, read in place by everyone.
//
// Data flow: a fetch writes the bytes of uncached blocks with write() (into
// a sparse file), then calls mark_cached(); a reader checks is_cached() and
// reads through slice(), a view into a shared mmap of that file, without a
// lock. Writes go through pwrite rather than the map: on this kind of VM a
// write fault on a fresh page of a shared mapping costs ~4 us, three times
// pwrite's cost per page, and a full disk then fails the write with an error
// rather than a SIGBUS. The
// cached-bitmap has one bit per block; a bit is set (release) only after every
// byte of its block is in the map, so a reader that sees it (acquire) sees the
// bytes. A bit is cleared only when its bytes are found lost (drop()).
//
// The map may fail under a reader (the file cut short, a disk error): that
// raises SIGBUS. Copies out of the map go through copy_out(), which turns
// it into an error; the caller then drops the blocks, which are fetched
// again. (UFFDIO_COPY from such a page fails with EFAULT instead.)
//
// The file is unnamed (O_TMPFILE, or unlinked at once) in the directory given,
// so nothing is left behind by a crash; its pages are allocated only as blocks
// arrive. The last block may be short when the object's size is not a multiple
// of the block size: it is cached once its bytes up to the object's end are.
//
// Thread safety: any number of readers and writers at once, provided no two
// writers write the same block and nobody writes a cached block (the chunker's
// fetch streams guarantee both).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>

#include "common/atomic_bitmap.h"
#include "common/status.h"

namespace lazyblock {

class BlockCache {
 public:
  // A cache for an object of `size` bytes in blocks of `block_size` (> 0),
  // backed by a sparse file in `dir`.
  static Result<std::unique_ptr<BlockCache>> create(uint64_t size, uint64_t block_size,
                                                    const std::filesystem::path& dir);
  ~BlockCache();
  BlockCache(const BlockCache&) = delete;
  BlockCache& operator=(const BlockCache&) = delete;

  uint64_t size() const { return size_; }
  uint64_t block_size() const { return block_size_; }

  // True if every block touching [offset, end) is cached. Requires
  // offset <= end <= size(); true for an empty range.
  bool is_cached(uint64_t offset, uint64_t end) const {
    return offset == end || cached_.all_set(offset / block_size_, block_end(end));
  }
  // The first byte in [offset, end) whose block is not cached, or `end` if
  // every block is.
  uint64_t first_uncached(uint64_t offset, uint64_t end) const;
  // The first byte in [offset, end) whose block is cached, or `end`.
  uint64_t first_cached(uint64_t offset, uint64_t end) const;

  // Marks the blocks in [offset, end) cached. `offset` must be block-aligned
  // and `end` block-aligned or size(); the caller has written all their bytes.
  void mark_cached(uint64_t offset, uint64_t end);

  // Writes `data` at `offset`, into blocks that are not cached. Requires
  // offset + data.size() <= size().
  Status write(uint64_t offset, std::span<const std::byte> data);

  // The bytes [offset, offset + length) of the map, to be read only where
  // blocks are cached. Requires offset + length <= size().
  std::span<const std::byte> slice(uint64_t offset, uint64_t length) const {
    return {map_ + offset, length};
  }

  // Copies [offset, offset + buffer.size()) of the map into `buffer`
  // (blocks that are cached); kIoError if the file under the map failed.
  // Requires offset + buffer.size() <= size().
  Status copy_out(uint64_t offset, std::span<std::byte> buffer) const;

  // Forgets the blocks touching [offset, end), whose bytes could not be
  // read, and, if the file has been cut short, every block past its end
  // (later writes extend it again): they are fetched again when next read.
  // Counted in drops(). The caller keeps fetches from marking blocks they
  // skipped as cached before the drop (see FetchStream).
  void drop(uint64_t offset, uint64_t end);
  // How many drops there have been: a reader that sees it change across its
  // copy cannot trust what it copied.
  uint64_t drops() const { return drops_.load(std::memory_order_seq_cst); }

  // How many bytes of the object are cached.
  uint64_t cached_bytes() const;

 private:
  BlockCache(uint64_t size, uint64_t block_size, int fd, std::byte* map);

  // Index one past the last block touching bytes before `end`.
  uint64_t block_end(uint64_t end) const { return (end + block_size_ - 1) / block_size_; }

  const uint64_t size_;
  const uint64_t block_size_;
  const int fd_;
  std::byte* const map_;  // size_ bytes, or nullptr for an empty object
  AtomicBitmap cached_;
  std::atomic<uint64_t> drops_{0};
};

}  // namespace lazyblock
