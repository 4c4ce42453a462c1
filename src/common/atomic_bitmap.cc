#include "common/atomic_bitmap.h"

#include <algorithm>
#include <bit>

namespace lazyblock {
namespace {

// Mask of bits [lo, hi) within one 64-bit word, 0 <= lo < hi <= 64.
uint64_t word_mask(uint64_t lo, uint64_t hi) {
  const uint64_t upper = hi == 64 ? ~uint64_t{0} : (uint64_t{1} << hi) - 1;
  return upper & ~((uint64_t{1} << lo) - 1);
}

}  // namespace

AtomicBitmap::AtomicBitmap(uint64_t bits)
    : bits_(bits), words_(std::make_unique<std::atomic<uint64_t>[]>((bits + 63) / 64)) {
  for (uint64_t i = 0; i < (bits + 63) / 64; ++i) words_[i].store(0, std::memory_order_relaxed);
}

// Walks [begin, end) word by word; `visit(word_index, mask)` returns true to stop.
template <typename Visit>
static uint64_t scan(uint64_t begin, uint64_t end, Visit visit) {
  uint64_t bit = begin;
  while (bit < end) {
    const uint64_t word = bit / 64;
    const uint64_t lo = bit % 64;
    const uint64_t hi = std::min<uint64_t>(64, end - word * 64);
    if (uint64_t found = visit(word, word_mask(lo, hi)); found != 64) return word * 64 + found;
    bit = (word + 1) * 64;
  }
  return end;
}

uint64_t AtomicBitmap::first_clear(uint64_t begin, uint64_t end) const {
  return scan(begin, end, [&](uint64_t word, uint64_t mask) -> uint64_t {
    const uint64_t clear = ~words_[word].load(std::memory_order_acquire) & mask;
    return clear == 0 ? 64 : static_cast<uint64_t>(std::countr_zero(clear));
  });
}

uint64_t AtomicBitmap::first_set(uint64_t begin, uint64_t end) const {
  return scan(begin, end, [&](uint64_t word, uint64_t mask) -> uint64_t {
    const uint64_t set = words_[word].load(std::memory_order_acquire) & mask;
    return set == 0 ? 64 : static_cast<uint64_t>(std::countr_zero(set));
  });
}

bool AtomicBitmap::all_set(uint64_t begin, uint64_t end) const {
  return first_clear(begin, end) == end;
}

void AtomicBitmap::set_range(uint64_t begin, uint64_t end) {
  scan(begin, end, [&](uint64_t word, uint64_t mask) -> uint64_t {
    words_[word].fetch_or(mask, std::memory_order_release);
    return 64;
  });
}

void AtomicBitmap::clear_range(uint64_t begin, uint64_t end) {
  scan(begin, end, [&](uint64_t word, uint64_t mask) -> uint64_t {
    words_[word].fetch_and(~mask, std::memory_order_seq_cst);
    return 64;
  });
}

uint64_t AtomicBitmap::count() const {
  uint64_t total = 0;
  for (uint64_t i = 0; i < (bits_ + 63) / 64; ++i) {
    total += static_cast<uint64_t>(std::popcount(words_[i].load(std::memory_order_acquire)));
  }
  return total;
}

std::vector<uint64_t> AtomicBitmap::words() const {
  std::vector<uint64_t> out((bits_ + 63) / 64);
  for (size_t i = 0; i < out.size(); ++i) out[i] = words_[i].load(std::memory_order_acquire);
  return out;
}

void AtomicBitmap::set_words(const std::vector<uint64_t>& words) {
  const size_t count = std::min<size_t>(words.size(), (bits_ + 63) / 64);
  for (size_t i = 0; i < count; ++i) {
    // Bits past the end stay clear whatever the words say.
    const uint64_t valid = (i + 1) * 64 <= bits_ ? ~uint64_t{0} : word_mask(0, bits_ - i * 64);
    words_[i].fetch_or(words[i] & valid, std::memory_order_release);
  }
}

}  // namespace lazyblock
