// MappedRegion: the owner of one mmap'ed range, unmapped when the owner goes.
#pragma once

#include <sys/mman.h>

#include <cerrno>
#include <cstddef>
#include <string>
#include <utility>

#include "common/status.h"

namespace lazyblock {

class MappedRegion {
 public:
  MappedRegion() = default;
  // Takes a range mmap returned (not MAP_FAILED).
  MappedRegion(void* base, size_t size) : base_(static_cast<std::byte*>(base)), size_(size) {}
  MappedRegion(MappedRegion&& other) noexcept
      : base_(std::exchange(other.base_, nullptr)), size_(std::exchange(other.size_, 0)) {}
  MappedRegion& operator=(MappedRegion&& other) noexcept {
    if (this != &other) {
      reset();
      base_ = std::exchange(other.base_, nullptr);
      size_ = std::exchange(other.size_, 0);
    }
    return *this;
  }
  MappedRegion(const MappedRegion&) = delete;
  MappedRegion& operator=(const MappedRegion&) = delete;
  ~MappedRegion() { reset(); }

  // mmap(nullptr, size, prot, flags, fd, offset); `what` names the range for
  // the error.
  static Result<MappedRegion> map(size_t size, int prot, int flags, int fd, off_t offset,
                                  const std::string& what) {
    void* base = ::mmap(nullptr, size, prot, flags, fd, offset);
    if (base == MAP_FAILED) return posix_error("map " + what, errno);
    return MappedRegion(base, size);
  }

  std::byte* data() const { return base_; }
  size_t size() const { return size_; }
  bool valid() const { return base_ != nullptr; }

  void reset() {
    if (base_ != nullptr) ::munmap(base_, size_);
    base_ = nullptr;
    size_ = 0;
  }

 private:
  std::byte* base_ = nullptr;
  size_t size_ = 0;
};

}  // namespace lazyblock
