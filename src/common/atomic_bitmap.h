// AtomicBitmap: one bit per block, set once the block's bytes are in place.
// Readers test bits without a lock (acquire loads); writers set them with
// release fetch_or after the bytes they stand for are in place, so a reader
// that sees a bit set also sees the bytes. A bit is cleared only when its
// bytes are lost (clear_range): a reader that saw it set just before may
// still be reading, and must find out another way (BlockCache::drops).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

namespace lazyblock {

class AtomicBitmap {
 public:
  explicit AtomicBitmap(uint64_t bits);

  uint64_t size() const { return bits_; }

  bool test(uint64_t bit) const {
    return (words_[bit / 64].load(std::memory_order_acquire) >> (bit % 64)) & 1;
  }
  // True if every bit in [begin, end) is set; true for an empty range.
  bool all_set(uint64_t begin, uint64_t end) const;
  // The first bit in [begin, end) that is clear, or `end` if none is.
  uint64_t first_clear(uint64_t begin, uint64_t end) const;
  // The first bit in [begin, end) that is set, or `end` if none is.
  uint64_t first_set(uint64_t begin, uint64_t end) const;
  // Sets every bit in [begin, end).
  void set_range(uint64_t begin, uint64_t end);
  // Clears every bit in [begin, end) (see above for what readers see).
  void clear_range(uint64_t begin, uint64_t end);
  uint64_t count() const;

  // The bits as 64-bit words (bit i is bit i % 64 of word i / 64), each
  // word read atomically: a snapshot for saving the bitmap.
  std::vector<uint64_t> words() const;
  // Sets every bit that is set in `words` (as words() gives them).
  void set_words(const std::vector<uint64_t>& words);

 private:
  const uint64_t bits_;
  std::unique_ptr<std::atomic<uint64_t>[]> words_;
};

}  // namespace lazyblock
