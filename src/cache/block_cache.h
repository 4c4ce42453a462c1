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
// The file may fail under a reader (cut short, a disk error). Copies into a
// buffer go through copy_out(), which reads the file with pread (no page
// table to fill in, which is costly on a VM) and turns a short read or an
// error into kIoError; the caller then drops the blocks, which are fetched
// again. A reader of slice() meets the failure as SIGBUS (sinks copy from
// it with guarded_copy; UFFDIO_COPY from such a page fails with EFAULT).
//
// The file is unnamed (O_TMPFILE, or unlinked at once) in the directory given,
// so nothing is left behind by a crash; its pages are allocated only as blocks
// arrive. The last block may be short when the object's size is not a multiple
// of the block size: it is cached once its bytes up to the object's end are.
//
// Space: the file needs room only for the blocks cached. They are all clean
// (copies of an immutable object, fetched again when missing), so they may be
// given back at any time: release() punches the blocks a one-pass reader has
// finished with, and a write that finds the filesystem full (ENOSPC, EDQUOT)
// punches the least recently used unit of the cache (kUnitSize bytes) that no
// one has pinned, and tries again; it fails only when nothing is left to give
// back, and the next write tries afresh (space freed meanwhile is used).
//
// Pins: a block may be punched only when no one reads it. Whoever reads the
// map pins the units the bytes lie in first (pin(), or hold_for_thread() for
// a view handed out), then checks is_cached(): a pinned unit is never
// punched, and a unit being punched cannot be pinned (the pin waits the
// punch out, which takes one fallocate). One word per unit holds its pin
// count and an "evicting" bit, so that taking a pin and starting a punch
// exclude each other in one atomic step; a cache hit costs one compare-and-
// swap and one decrement more than a bare read (none for a view of the unit
// its thread already holds).
//
// Thread safety: any number of readers and writers at once, provided no two
// writers write the same block and nobody writes a cached block without a
// pin on it (the chunker's fetch streams write only blocks that are not
// cached).
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>

#include "common/atomic_bitmap.h"
#include "common/mapped_region.h"
#include "common/mutex.h"
#include "common/status.h"
#include "common/unique_fd.h"

namespace lazyblock {

// Per unit of a BlockCache: its pin count and evicting bit, its last use.
struct Units;

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

  // Pins and least-recently-used order are kept per unit of this many bytes
  // (rounded up to whole blocks): one fetch chunk.
  static constexpr uint64_t kUnitSize = 4 * 1024 * 1024;

  // A pin on the units of a range: none of their blocks is punched while it
  // is held. Movable; released on destruction.
  class Pin {
   public:
    Pin() = default;
    Pin(Pin&& other) noexcept { *this = std::move(other); }
    Pin& operator=(Pin&& other) noexcept;
    ~Pin() { reset(); }
    void reset();

   private:
    friend class BlockCache;
    struct Units* units_ = nullptr;
    uint64_t first_ = 0;
    uint64_t end_ = 0;  // unit indices [first_, end_)
  };

  // Pins the units touching [offset, end) (end <= size()); waits out a punch
  // in progress there. Pin before checking is_cached(), read, then let go.
  Pin pin(uint64_t offset, uint64_t end) const;

  // Pins the units touching [offset, end) for the calling thread until it
  // calls hold_for_thread() again, on any cache, or the thread ends: for a
  // view handed to a caller who reads it before its thread's next view (a
  // page-fault handler's UFFDIO_COPY). The previous hold is released first;
  // a range within it keeps it, at no cost.
  void hold_for_thread(uint64_t offset, uint64_t end) const;

  // Gives back the space of the cached blocks wholly inside [offset, end)
  // (or reaching the object's end), unless a unit they lie in is pinned:
  // they are no longer cached, and fetched again if read. For a reader that
  // reads each byte once (cat, export). Returns the bytes given back.
  uint64_t release(uint64_t offset, uint64_t end);

  // Units punched because the filesystem was full, so far.
  uint64_t evictions() const { return evictions_.load(std::memory_order_relaxed); }

  // Marks the blocks in [offset, end) cached. `offset` must be block-aligned
  // and `end` block-aligned or size(); the caller has written all their bytes.
  void mark_cached(uint64_t offset, uint64_t end);

  // mark_cached, unless drop() has been called since drops() was
  // `drops_seen` (then false, nothing marked): for a writer whose bytes a
  // drop may have taken. Atomic with respect to drop().
  bool mark_cached_unless_dropped(uint64_t offset, uint64_t end, uint64_t drops_seen);

  // Writes `data` at `offset`, into blocks that are not cached (or pinned by
  // the caller). Requires offset + data.size() <= size(). On a full
  // filesystem, punches the least recently used unpinned unit and tries
  // again; fails (naming the cause) once there is nothing left to punch.
  // A file found cut short (a failing disk, a hand), before the write or
  // after it, loses every cached block (drop()) and gets its size back. The
  // check before keeps a write from extending a cut file over blocks still
  // marked cached, which would read as zeros; a cut that lands after that
  // check, before the pwrite, is extended over all the same, and found by
  // the check after. A reader that copies those zeros meanwhile learns it
  // from copy_holds(): the write is still under way and the file short.
  // (The file is one never-written page longer than the object, so that a
  // write that extends a file cut under it never hides the cut: a write of
  // the last block included.)
  Status write(uint64_t offset, std::span<const std::byte> data);

  // The bytes [offset, offset + length) of the map, to be read only where
  // blocks are cached. Requires offset + length <= size().
  std::span<const std::byte> slice(uint64_t offset, uint64_t length) const {
    return {map_.data() + offset, length};
  }

  // Reads [offset, offset + buffer.size()) of the file into `buffer`
  // (blocks that are cached); kIoError if the file failed or ends early.
  // Requires offset + buffer.size() <= size().
  Status copy_out(uint64_t offset, std::span<std::byte> buffer) const;
  // The size of the cache file of an object of `size` (> 0) bytes: one page
  // more, a guard never written (see write()).
  static uint64_t file_size_for(uint64_t size);

  // The error of a copy out of [offset, end) that met a failed file.
  static Status unreadable(uint64_t offset, uint64_t end);

  // Forgets the blocks touching [offset, end), whose bytes could not be
  // read, and, if the file has been cut short, every block past its end
  // (the next write restores its size): they are fetched again when next
  // read.
  // Counted in drops(). Writers whose bytes it may have taken mark them
  // with mark_cached_unless_dropped() (see FetchStream).
  void drop(uint64_t offset, uint64_t end);
  // How many drops there have been: a reader notes it before its copy and
  // passes it to copy_holds() after.
  uint64_t drops() const { return drops_.load(std::memory_order_seq_cst); }
  // Whether a copy of cached blocks, made since drops() was `drops_seen`,
  // can be trusted: no drop since. A write under way over a file that is
  // short may have extended it, cut under it, with holes that the copy
  // read as zeros: its check after drops everything, and this waits for
  // that (one fstat and a drop) before it answers. Costs an fstat only
  // while a write is under way.
  bool copy_holds(uint64_t drops_seen) const;

  // How many bytes of the object are cached.
  uint64_t cached_bytes() const;

 private:
  BlockCache(uint64_t size, uint64_t block_size, UniqueFd fd, MappedRegion map);

  // Index one past the last block touching bytes before `end`.
  uint64_t block_end(uint64_t end) const { return (end + block_size_ - 1) / block_size_; }

  // Unit indices touching [offset, end).
  uint64_t unit_of(uint64_t offset) const { return offset / unit_size_; }
  uint64_t unit_end(uint64_t end) const { return (end + unit_size_ - 1) / unit_size_; }
  // Notes a use of units [first, end) for the least-recently-used order.
  void touch(uint64_t first, uint64_t end) const;
  // Punches the cached blocks of [block_begin, block_end) in `unit`, which
  // must not be pinned: false (nothing done) if it is. Returns the bytes
  // punched through `punched`.
  bool punch_unit(uint64_t unit, uint64_t block_begin, uint64_t block_end, uint64_t* punched);
  // Punches the least recently used unpinned unit holding cached blocks,
  // other than `busy`; false if there is none (or punching is unsupported).
  // True at once if another eviction came after `evictions_seen`.
  bool evict_one(uint64_t busy, uint64_t evictions_seen);
  // write() between its checks: pwrite until all of `data` is written,
  // punching a unit on a full filesystem.
  Status write_all(uint64_t offset, std::span<const std::byte> data);
  // Called around a write: if the file is shorter than size_, every cached
  // block is suspect (drop()) and the size is restored.
  void check_not_cut();
  // The file's size if it is shorter than file_size_for(size_) (it was cut
  // and its size not yet restored), else nullopt (nor if fstat fails).
  std::optional<uint64_t> cut_size() const;

  const uint64_t size_;
  const uint64_t block_size_;
  const uint64_t unit_size_;
  const UniqueFd fd_;
  const MappedRegion map_;  // size_ bytes, or nothing for an empty object
  AtomicBitmap cached_;
  std::atomic<uint64_t> drops_{0};
  // Writes between their check before and their check after (see write()).
  std::atomic<uint32_t> writes_under_way_{0};
  Mutex drop_mu_;  // makes drop() and mark_cached_unless_dropped() exclusive
  // Shared with threads' holds, which may outlive the cache.
  const std::shared_ptr<Units> units_;
  // The least-recently-used order's time: advanced by each fill and each
  // eviction; a use stamps its units with it.
  std::atomic<uint32_t> clock_{1};
  std::atomic<uint64_t> evictions_{0};
  Mutex evict_mu_;  // one eviction at a time
  // One write(2) into the file at a time. The filesystem takes the file's
  // lock for each anyway (ext4, xfs: buffered writes are exclusive), and
  // its waiters spin while the writer copies; waiting here they sleep, and
  // the core decodes or receives another fetch's bytes instead.
  Mutex write_mu_;
  std::atomic<bool> punch_unsupported_{false};
};

}  // namespace lazyblock
