// BufferPool: reusable I/O buffers of one size, shared process-wide.
//
// Why: a fresh 256 KiB buffer is an mmap whose 64 pages each fault on first
// touch (~4 us a fault on a VM here), and streams start in bursts, exactly
// when latency counts. Buffers returned to the pool keep their pages.
#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <vector>

#include "common/mutex.h"

namespace lazyblock {

class BufferPool {
 public:
  // A pool of buffers of `buffer_size` bytes, keeping at most `max_free`
  // idle buffers.
  BufferPool(size_t buffer_size, size_t max_free);

  class Buffer {
   public:
    Buffer(Buffer&& other) noexcept;
    Buffer& operator=(Buffer&&) = delete;
    ~Buffer();
    std::span<std::byte> span() { return {data_.get(), pool_->buffer_size_}; }

   private:
    friend class BufferPool;
    Buffer(BufferPool* pool, std::unique_ptr<std::byte[]> data)
        : pool_(pool), data_(std::move(data)) {}
    BufferPool* pool_;
    std::unique_ptr<std::byte[]> data_;
  };

  // A buffer from the free list, or a new one. Its contents are undefined.
  Buffer get();

 private:
  const size_t buffer_size_;
  const size_t max_free_;
  Mutex mu_;
  std::vector<std::unique_ptr<std::byte[]>> free_ GUARDED_BY(mu_);
};

}  // namespace lazyblock
