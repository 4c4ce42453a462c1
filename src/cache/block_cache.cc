#include "cache/block_cache.h"
#include "common/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "common/log.h"

namespace lazyblock {

struct Units {
  explicit Units(uint64_t n)
      : count(n), state(new std::atomic<uint32_t>[n]), last_use(new std::atomic<uint32_t>[n]) {
    for (uint64_t i = 0; i < n; ++i) {
      state[i].store(0, std::memory_order_relaxed);
      last_use[i].store(0, std::memory_order_relaxed);
    }
  }
  const uint64_t count;
  // Pin count, or kEvicting while the unit's blocks are being punched (then
  // no pin can be taken): one word, so that the two exclude each other.
  std::unique_ptr<std::atomic<uint32_t>[]> state;
  std::unique_ptr<std::atomic<uint32_t>[]> last_use;  // the cache's clock_ then
};

namespace {

constexpr uint32_t kEvicting = 1u << 31;

void pin_unit(Units& units, uint64_t unit) {
  std::atomic<uint32_t>& state = units.state[unit];
  uint32_t seen = state.load(std::memory_order_relaxed);
  for (;;) {
    if ((seen & kEvicting) != 0) {
      // A punch takes one fallocate: let it finish.
      std::this_thread::yield();
      seen = state.load(std::memory_order_relaxed);
      continue;
    }
    // Acquire: pairs with the release that ends a punch, so that its cleared
    // bits are seen by the is_cached() that follows.
    if (state.compare_exchange_weak(seen, seen + 1, std::memory_order_acquire,
                                    std::memory_order_relaxed)) {
      return;
    }
  }
}

void unpin_units(Units& units, uint64_t first, uint64_t end) {
  // Release: the reads made under the pin happen before any later punch.
  for (uint64_t unit = first; unit < end; ++unit) {
    units.state[unit].fetch_sub(1, std::memory_order_release);
  }
}

// The units a thread holds for the view it was last handed
// (BlockCache::hold_for_thread); released when it asks for another, or ends.
// It also keeps the Units of the last few caches it held in alive (kKept):
// a thread that moves between the caches of a disk's builds then holds and
// releases without touching the counts of their shared_ptrs, which all the
// threads reading that cache would otherwise bounce between their cores.
struct ThreadHold {
  static constexpr size_t kKept = 4;
  std::array<std::shared_ptr<Units>, kKept> kept;  // the most recently held first
  Units* units = nullptr;                          // the one held now: among kept
  uint64_t first = 0;
  uint64_t end = 0;

  void release() {
    if (units != nullptr) unpin_units(*units, first, end);
    units = nullptr;
    first = end = 0;
  }
  // Makes `next` the first of kept (released first: nothing held is dropped).
  void keep(const std::shared_ptr<Units>& next) {
    auto found = std::find_if(kept.begin(), kept.end(),
                              [&](const std::shared_ptr<Units>& k) { return k == next; });
    if (found == kept.end()) {
      found = kept.end() - 1;
      *found = next;
    }
    std::rotate(kept.begin(), found, found + 1);
  }
  ~ThreadHold() { release(); }
};
thread_local ThreadHold thread_hold;

uint64_t page_size() {
  static const uint64_t size = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  return size;
}

}  // namespace

// A write extends the file only if it was cut short, and then never back to
// this size, so that the size after a write tells whether the file was cut
// before it (check_not_cut).
uint64_t BlockCache::file_size_for(uint64_t size) { return size + page_size(); }

Result<std::unique_ptr<BlockCache>> BlockCache::create(uint64_t size, uint64_t block_size,
                                                       const std::filesystem::path& dir) {
  if (block_size == 0) return Status::invalid_argument("block size must be positive");
  Result<UniqueFd> fd = open_unnamed_file(dir, "cache file");
  if (!fd) return fd.status();
  MappedRegion map;
  if (size > 0) {
    if (::ftruncate(fd->get(), static_cast<off_t>(file_size_for(size))) != 0) {
      return posix_error(fmt::format("size cache file in {} to {} bytes", dir.string(), size),
                         errno);
    }
    Result<MappedRegion> mapped =
        MappedRegion::map(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0,
                          fmt::format("cache file of {} bytes", size));
    if (!mapped) return mapped.status();
    map = std::move(*mapped);
  }
  return std::unique_ptr<BlockCache>(
      new BlockCache(size, block_size, std::move(*fd), std::move(map)));
}

BlockCache::BlockCache(uint64_t size, uint64_t block_size, UniqueFd fd, MappedRegion map)
    : size_(size),
      block_size_(block_size),
      unit_size_((kUnitSize + block_size - 1) / block_size * block_size),
      fd_(std::move(fd)),
      map_(std::move(map)),
      cached_((size + block_size - 1) / block_size),
      units_(std::make_shared<Units>((size + unit_size_ - 1) / unit_size_)) {}

BlockCache::~BlockCache() = default;

uint64_t BlockCache::first_uncached(uint64_t offset, uint64_t end) const {
  if (offset >= end) return end;
  const uint64_t block = cached_.first_clear(offset / block_size_, block_end(end));
  return std::min(end, std::max(offset, block * block_size_));
}

uint64_t BlockCache::first_cached(uint64_t offset, uint64_t end) const {
  if (offset >= end) return end;
  const uint64_t block = cached_.first_set(offset / block_size_, block_end(end));
  return std::min(end, std::max(offset, block * block_size_));
}

BlockCache::Pin& BlockCache::Pin::operator=(Pin&& other) noexcept {
  if (this != &other) {
    reset();
    units_ = other.units_;
    first_ = other.first_;
    end_ = other.end_;
    other.units_ = nullptr;
  }
  return *this;
}

void BlockCache::Pin::reset() {
  if (units_ != nullptr) unpin_units(*units_, first_, end_);
  units_ = nullptr;
}

BlockCache::Pin BlockCache::pin(uint64_t offset, uint64_t end) const {
  Pin pin;
  if (offset >= end) return pin;
  pin.units_ = units_.get();
  pin.first_ = unit_of(offset);
  pin.end_ = unit_end(end);
  for (uint64_t unit = pin.first_; unit < pin.end_; ++unit) pin_unit(*units_, unit);
  touch(pin.first_, pin.end_);
  return pin;
}

void BlockCache::hold_for_thread(uint64_t offset, uint64_t end) const {
  ThreadHold& hold = thread_hold;
  if (offset >= end) return;
  const uint64_t first = unit_of(offset);
  const uint64_t last = unit_end(end);
  if (hold.units == units_.get() && first >= hold.first && last <= hold.end) return;
  hold.release();
  for (uint64_t unit = first; unit < last; ++unit) pin_unit(*units_, unit);
  if (hold.kept[0] != units_) hold.keep(units_);
  hold.units = units_.get();
  hold.first = first;
  hold.end = last;
  touch(first, last);
}

void BlockCache::touch(uint64_t first, uint64_t end) const {
  const uint32_t now = clock_.load(std::memory_order_relaxed);
  for (uint64_t unit = first; unit < end; ++unit) {
    // Written only when it changes: a hit mostly just reads it.
    if (units_->last_use[unit].load(std::memory_order_relaxed) != now) {
      units_->last_use[unit].store(now, std::memory_order_relaxed);
    }
  }
}

bool BlockCache::punch_unit(uint64_t unit, uint64_t block_begin, uint64_t block_end,
                            uint64_t* punched) {
  uint32_t idle = 0;
  if (!units_->state[unit].compare_exchange_strong(idle, kEvicting, std::memory_order_acquire,
                                                   std::memory_order_relaxed)) {
    return false;  // pinned (or being punched)
  }
  // No reader holds the unit and none can pin it now: what is cached there
  // is forgotten first, then its space given back. Blocks not cached (a
  // stream may be writing them) are left alone.
  const uint64_t page = page_size();
  for (uint64_t block = cached_.first_set(block_begin, block_end); block < block_end;) {
    const uint64_t run_end = cached_.first_clear(block, block_end);
    cached_.clear_range(block, run_end);
    const uint64_t begin = block * block_size_;
    const uint64_t end = std::min(run_end * block_size_, size_);
    // Whole pages only: a page shared with a block outside the run stays.
    const uint64_t from = (begin + page - 1) / page * page;
    const uint64_t to = end == size_ ? (end + page - 1) / page * page : end / page * page;
    if (from < to) {
      if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      static_cast<off_t>(from), static_cast<off_t>(to - from)) == 0) {
        *punched += to - from;
      } else if (errno == EOPNOTSUPP || errno == ENOSYS) {
        punch_unsupported_.store(true, std::memory_order_relaxed);
      }
    }
    block = cached_.first_set(run_end, block_end);
  }
  units_->state[unit].store(0, std::memory_order_release);
  return true;
}

uint64_t BlockCache::release(uint64_t offset, uint64_t end) {
  const uint64_t first_block = (offset + block_size_ - 1) / block_size_;
  const uint64_t last_block = end >= size_ ? cached_.size() : end / block_size_;
  uint64_t punched = 0;
  const uint64_t blocks_per_unit = unit_size_ / block_size_;
  for (uint64_t block = first_block; block < last_block;) {
    const uint64_t unit = block / blocks_per_unit;
    const uint64_t stop = std::min(last_block, (unit + 1) * blocks_per_unit);
    // A unit someone reads keeps its blocks: they go when it is evicted.
    punch_unit(unit, block, stop, &punched);
    block = stop;
  }
  return punched;
}

bool BlockCache::evict_one(uint64_t busy, uint64_t evictions_seen) {
  MutexLock lock(evict_mu_);
  // Another writer evicted since this one's write failed: try that space.
  if (evictions_.load(std::memory_order_relaxed) != evictions_seen) return true;
  if (punch_unsupported_.load(std::memory_order_relaxed)) return false;
  const uint64_t blocks_per_unit = unit_size_ / block_size_;
  for (int attempt = 0; attempt < 4; ++attempt) {
    uint64_t victim = units_->count;
    uint32_t oldest = UINT32_MAX;
    for (uint64_t unit = 0; unit < units_->count; ++unit) {
      if (unit == busy || units_->state[unit].load(std::memory_order_relaxed) != 0) continue;
      const uint64_t begin = unit * blocks_per_unit;
      const uint64_t end = std::min(cached_.size(), begin + blocks_per_unit);
      if (cached_.first_set(begin, end) >= end) continue;
      const uint32_t used = units_->last_use[unit].load(std::memory_order_relaxed);
      if (used < oldest) {
        oldest = used;
        victim = unit;
      }
    }
    if (victim == units_->count) return false;
    uint64_t punched = 0;
    const uint64_t begin = victim * blocks_per_unit;
    if (!punch_unit(victim, begin, std::min(cached_.size(), begin + blocks_per_unit), &punched)) {
      continue;  // pinned since the scan: pick again
    }
    clock_.fetch_add(1, std::memory_order_relaxed);
    evictions_.fetch_add(1, std::memory_order_relaxed);
    log(LogLevel::kDebug, "cache file full: gave back {} bytes of unit {}", punched, victim);
    return !punch_unsupported_.load(std::memory_order_relaxed);
  }
  return false;
}

Status BlockCache::write(uint64_t offset, std::span<const std::byte> data) {
  // A write past the end of a cut file would extend it with holes, where a
  // block whose cut no reader has met yet reads as zeros: the cut is found
  // (and every block dropped) first, so that a reader that copies those
  // zeros sees drops() change. A cut after this check is extended over all
  // the same: until the check after has dropped, the count of writes under
  // way tells readers to look at the file's size (copy_holds).
  writes_under_way_.fetch_add(1, std::memory_order_seq_cst);
  check_not_cut();
  Status written = write_all(offset, data);
  check_not_cut();
  writes_under_way_.fetch_sub(1, std::memory_order_seq_cst);
  return written;
}

Status BlockCache::write_all(uint64_t offset, std::span<const std::byte> data) {
  const uint64_t asked = data.size();
  const uint64_t start = offset;
  while (!data.empty()) {
    const uint64_t evictions_seen = evictions_.load(std::memory_order_relaxed);
    ssize_t put = 0;
    {
      MutexLock lock(write_mu_);
      put = ::pwrite(fd_.get(), data.data(), data.size(), static_cast<off_t>(offset));
    }
    if (put > 0) {
      offset += static_cast<uint64_t>(put);
      data = data.subspan(static_cast<size_t>(put));
      continue;
    }
    const int error = put < 0 ? errno : EIO;
    if (error == EINTR) continue;
    if ((error == ENOSPC || error == EDQUOT) && evict_one(unit_of(offset), evictions_seen)) {
      continue;
    }
    return posix_error(fmt::format("write {} bytes to the cache file at {}{}", asked, start,
                                   error == ENOSPC || error == EDQUOT
                                       ? " (nothing of this cache was left to give back)"
                                       : ""),
                       error);
  }
  return Status::ok();
}

bool BlockCache::copy_holds(uint64_t drops_seen) const {
  // A write whose pwrite extended a cut file drops everything before it
  // counts itself out, and the size is restored only after a drop: a
  // reader that sees no write under way, or a file of full size, sees that
  // drop in drops() too. Every write under way makes its check after, so
  // the wait is one check's length.
  for (;;) {
    if (drops() != drops_seen) return false;
    if (writes_under_way_.load(std::memory_order_seq_cst) == 0 || !cut_size()) {
      return drops() == drops_seen;
    }
    std::this_thread::yield();
  }
}

std::optional<uint64_t> BlockCache::cut_size() const {
  struct stat st {};
  if (::fstat(fd_.get(), &st) != 0) return std::nullopt;
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size >= file_size_for(size_)) return std::nullopt;
  return size;
}

void BlockCache::check_not_cut() {
  const std::optional<uint64_t> cut = cut_size();
  if (!cut) return;
  // The file was cut short (and perhaps extended again by writes since, so
  // that a lost block reads as zeros rather than faulting): nothing cached
  // can be trusted. No write of ours reaches the guard page, so a file that
  // was cut stays short, even after a write of the object's last block.
  log(LogLevel::kWarn,
      "the cache file was cut short to {} bytes: every cached block is "
      "fetched again",
      *cut);
  drop(0, size_);
  if (::ftruncate(fd_.get(), static_cast<off_t>(file_size_for(size_))) != 0) {
    log(LogLevel::kWarn, "cannot restore the cache file's size: {}", std::strerror(errno));
  }
}

void BlockCache::mark_cached(uint64_t offset, uint64_t end) {
  if (offset >= end) return;
  cached_.set_range(offset / block_size_, block_end(end));
  // A fill is a use, and a tick of the clock (a hit only reads it), so that
  // a unit read after this fill counts as newer than it.
  touch(unit_of(offset), unit_end(end));
  clock_.fetch_add(1, std::memory_order_relaxed);
}

Status BlockCache::copy_out(uint64_t offset, std::span<std::byte> buffer) const {
  // pread, not a copy from the map: the kernel copies from its page cache
  // with no page table of ours to fill in. On this kind of VM, where mapping
  // a page costs a trip to the hypervisor, that is 7x faster (22 against
  // 3 GB/s for 256 KiB reads), and a file cut short reads short rather than
  // raising SIGBUS.
  const uint64_t start = offset;
  while (!buffer.empty()) {
    const ssize_t got =
        ::pread(fd_.get(), buffer.data(), buffer.size(), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return unreadable(start, offset + buffer.size());
    offset += static_cast<uint64_t>(got);
    buffer = buffer.subspan(static_cast<size_t>(got));
  }
  return Status::ok();
}

Status BlockCache::unreadable(uint64_t offset, uint64_t end) {
  return Status::io_error(fmt::format(
      "the cache file could not be read at [{}, {}) (a disk error, or the file was cut short)",
      offset, end));
}

bool BlockCache::mark_cached_unless_dropped(uint64_t offset, uint64_t end, uint64_t drops_seen) {
  MutexLock lock(drop_mu_);
  if (drops_.load(std::memory_order_seq_cst) != drops_seen) return false;
  mark_cached(offset, end);
  return true;
}

void BlockCache::drop(uint64_t offset, uint64_t end) {
  MutexLock lock(drop_mu_);
  cached_.clear_range(offset / block_size_, block_end(end));
  if (const std::optional<uint64_t> cut = cut_size(); cut && *cut < size_) {
    // Every block past the cut, the one it cuts included.
    cached_.clear_range(*cut / block_size_, cached_.size());
  }
  // Counted after the bits are cleared: a reader that sees the new count
  // (and so no change across its copy) sees the bits cleared too.
  drops_.fetch_add(1, std::memory_order_seq_cst);
}

uint64_t BlockCache::cached_bytes() const {
  const uint64_t blocks = cached_.count();
  if (blocks == 0) return 0;
  // Every block is full but perhaps the last.
  const bool last_cached = cached_.test(cached_.size() - 1);
  const uint64_t last_short = size_ % block_size_ == 0 ? 0 : block_size_ - size_ % block_size_;
  return blocks * block_size_ - (last_cached ? last_short : 0);
}

}  // namespace lazyblock
