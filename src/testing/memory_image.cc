#include "testing/memory_image.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <random>
#include <string_view>

namespace lazyblock::testing {
namespace {

constexpr size_t kPage = 4096;
constexpr size_t kDistinctRepeated = 48;

constexpr std::array<std::string_view, 24> kWords = {
    "the ",     "snapshot ", "memory ", "page ",   "fault ",   "return ", "struct ", "int ",
    "0x7f3a ",  "error: ",   "void ",   "kernel ", "{\n",      "}\n",     "ERROR ",  "INFO ",
    "request ", "GET /",     "200 ",    "null, ",  "\"id\": ", "true ",   "buffer ", "= ",
};

void fill_text(std::mt19937_64& rng, std::byte* page, size_t length) {
  size_t at = 0;
  while (at < length) {
    const std::string_view word = kWords[rng() % kWords.size()];
    const size_t take = std::min(word.size(), length - at);
    std::memcpy(page + at, word.data(), take);
    at += take;
  }
}

void fill_random(std::mt19937_64& rng, std::byte* page, size_t length) {
  for (size_t at = 0; at < length; at += 8) {
    const uint64_t word = rng();
    std::memcpy(page + at, &word, std::min<size_t>(8, length - at));
  }
}

}  // namespace

std::vector<std::byte> make_memory_image(uint64_t size, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::byte> repeated(kDistinctRepeated * kPage);
  for (size_t i = 0; i < kDistinctRepeated; ++i) {
    if (i % 2 == 0) {
      fill_text(rng, repeated.data() + i * kPage, kPage);
    } else {
      fill_random(rng, repeated.data() + i * kPage, kPage);
    }
  }
  std::vector<std::byte> image(size);
  for (uint64_t offset = 0; offset < size; offset += kPage) {
    std::byte* page = image.data() + offset;
    const size_t length = std::min<uint64_t>(kPage, size - offset);
    const uint64_t kind = rng() % 100;
    if (kind < 35) continue;  // zeros
    if (kind < 55) {
      std::memcpy(page, repeated.data() + (rng() % kDistinctRepeated) * kPage, length);
    } else if (kind < 80) {
      fill_text(rng, page, length);
    } else {
      fill_random(rng, page, length);
    }
  }
  return image;
}

}  // namespace lazyblock::testing
