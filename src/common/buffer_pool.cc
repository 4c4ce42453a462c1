#include "common/buffer_pool.h"

namespace lazyblock {

BufferPool::BufferPool(size_t buffer_size, size_t max_free)
    : buffer_size_(buffer_size), max_free_(max_free) {}

BufferPool::Buffer::Buffer(Buffer&& other) noexcept
    : pool_(other.pool_), data_(std::move(other.data_)) {}

BufferPool::Buffer::~Buffer() {
  if (!data_) return;
  MutexLock lock(pool_->mu_);
  // Beyond the bound, the buffer is simply freed.
  if (pool_->free_.size() < pool_->max_free_) pool_->free_.push_back(std::move(data_));
}

BufferPool::Buffer BufferPool::get() {
  {
    MutexLock lock(mu_);
    if (!free_.empty()) {
      std::unique_ptr<std::byte[]> data = std::move(free_.back());
      free_.pop_back();
      return Buffer(this, std::move(data));
    }
  }
  // Default-initialised: no memset of bytes that are about to be overwritten.
  return Buffer(this, std::unique_ptr<std::byte[]>(new std::byte[buffer_size_]));
}

}  // namespace lazyblock
