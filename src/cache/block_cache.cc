#include "cache/block_cache.h"
#include "cache/guarded_copy.h"
#include "common/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include <fmt/format.h>

namespace lazyblock {
namespace {

// An unnamed file in `dir`: O_TMPFILE where the filesystem has it, else a
// named temporary file unlinked at once.
Result<int> open_unnamed_file(const std::filesystem::path& dir) {
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd >= 0) return fd;
  if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL) {
    return posix_error("create cache file in " + dir.string(), errno);
  }
  std::string name = (dir / "lazyblock-cache-XXXXXX").string();
  fd = ::mkostemp(name.data(), O_CLOEXEC);
  if (fd < 0) return posix_error("create cache file in " + dir.string(), errno);
  ::unlink(name.c_str());
  return fd;
}

}  // namespace

Result<std::unique_ptr<BlockCache>> BlockCache::create(uint64_t size, uint64_t block_size,
                                                       const std::filesystem::path& dir) {
  if (block_size == 0) return Status::invalid_argument("block size must be positive");
  Result<int> fd = open_unnamed_file(dir);
  if (!fd) return fd.status();
  std::byte* map = nullptr;
  if (size > 0) {
    if (::ftruncate(*fd, static_cast<off_t>(size)) != 0) {
      const int err = errno;
      ::close(*fd);
      return posix_error(fmt::format("size cache file in {} to {} bytes", dir.string(), size),
                         err);
    }
    void* addr = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    if (addr == MAP_FAILED) {
      const int err = errno;
      ::close(*fd);
      return posix_error(fmt::format("map cache file of {} bytes", size), err);
    }
    map = static_cast<std::byte*>(addr);
  }
  return std::unique_ptr<BlockCache>(new BlockCache(size, block_size, *fd, map));
}

BlockCache::BlockCache(uint64_t size, uint64_t block_size, int fd, std::byte* map)
    : size_(size),
      block_size_(block_size),
      fd_(fd),
      map_(map),
      cached_((size + block_size - 1) / block_size) {}

BlockCache::~BlockCache() {
  if (map_ != nullptr) ::munmap(map_, size_);
  ::close(fd_);
}

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

Status BlockCache::write(uint64_t offset, std::span<const std::byte> data) {
  return pwrite_all(fd_, data, offset, "the cache file");
}

void BlockCache::mark_cached(uint64_t offset, uint64_t end) {
  cached_.set_range(offset / block_size_, block_end(end));
}

Status BlockCache::copy_out(uint64_t offset, std::span<std::byte> buffer) const {
  if (buffer.empty()) return Status::ok();
  if (!guarded_copy(buffer.data(), map_ + offset, buffer.size())) {
    return Status::io_error(fmt::format(
        "the cache file could not be read at [{}, {}) (a disk error, or the file was cut short)",
        offset, offset + buffer.size()));
  }
  return Status::ok();
}

void BlockCache::drop(uint64_t offset, uint64_t end) {
  drops_.fetch_add(1, std::memory_order_seq_cst);
  cached_.clear_range(offset / block_size_, block_end(end));
  struct stat st {};
  if (::fstat(fd_, &st) == 0 && static_cast<uint64_t>(st.st_size) < size_) {
    cached_.clear_range(static_cast<uint64_t>(st.st_size) / block_size_, cached_.size());
  }
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
