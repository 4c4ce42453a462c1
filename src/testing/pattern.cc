#include "testing/pattern.h"

namespace lazyblock::testing {
namespace {

// splitmix64's finaliser: a cheap bijection that scatters neighbouring words.
uint64_t mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace

std::byte pattern_byte(uint64_t seed, uint64_t offset) {
  const uint64_t word = mix((offset / 8) ^ (seed * 0x100000001b3ULL));
  return static_cast<std::byte>(word >> (8 * (offset % 8)));
}

void fill_pattern(uint64_t seed, uint64_t offset, std::span<std::byte> out) {
  size_t i = 0;
  // Head up to a word boundary, then whole words, then the tail.
  for (; i < out.size() && (offset + i) % 8 != 0; ++i) out[i] = pattern_byte(seed, offset + i);
  for (; i + 8 <= out.size(); i += 8) {
    const uint64_t word = mix(((offset + i) / 8) ^ (seed * 0x100000001b3ULL));
    for (int b = 0; b < 8; ++b) out[i + b] = static_cast<std::byte>(word >> (8 * b));
  }
  for (; i < out.size(); ++i) out[i] = pattern_byte(seed, offset + i);
}

std::vector<std::byte> make_pattern(uint64_t seed, uint64_t offset, uint64_t length) {
  std::vector<std::byte> out(length);
  fill_pattern(seed, offset, out);
  return out;
}

size_t first_pattern_mismatch(uint64_t seed, uint64_t offset, std::span<const std::byte> data) {
  std::byte expected[4096];
  for (size_t done = 0; done < data.size();) {
    const size_t n = std::min(sizeof(expected), data.size() - done);
    fill_pattern(seed, offset + done, std::span(expected, n));
    for (size_t i = 0; i < n; ++i) {
      if (data[done + i] != expected[i]) return done + i;
    }
    done += n;
  }
  return data.size();
}

}  // namespace lazyblock::testing
