#include "common/atomic_bitmap.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace lazyblock {
namespace {

TEST(AtomicBitmapTest, StartsClear) {
  AtomicBitmap bits(130);
  EXPECT_EQ(bits.size(), 130u);
  EXPECT_EQ(bits.count(), 0u);
  EXPECT_FALSE(bits.test(0));
  EXPECT_FALSE(bits.test(129));
  EXPECT_TRUE(bits.all_set(5, 5));
  EXPECT_FALSE(bits.all_set(0, 1));
  EXPECT_EQ(bits.first_clear(0, 130), 0u);
  EXPECT_EQ(bits.first_set(0, 130), 130u);
}

TEST(AtomicBitmapTest, RangesAcrossWordBoundaries) {
  AtomicBitmap bits(200);
  bits.set_range(60, 131);
  EXPECT_EQ(bits.count(), 71u);
  EXPECT_FALSE(bits.test(59));
  EXPECT_TRUE(bits.test(60));
  EXPECT_TRUE(bits.test(64));
  EXPECT_TRUE(bits.test(130));
  EXPECT_FALSE(bits.test(131));
  EXPECT_TRUE(bits.all_set(60, 131));
  EXPECT_FALSE(bits.all_set(59, 131));
  EXPECT_FALSE(bits.all_set(60, 132));
  EXPECT_EQ(bits.first_clear(60, 200), 131u);
  EXPECT_EQ(bits.first_clear(0, 200), 0u);
  EXPECT_EQ(bits.first_set(0, 200), 60u);
  EXPECT_EQ(bits.first_set(131, 200), 200u);
  EXPECT_EQ(bits.first_set(70, 80), 70u);
  EXPECT_EQ(bits.first_clear(70, 80), 80u);  // none clear: the end
}

TEST(AtomicBitmapTest, WholeWordsAndTheLastPartialWord) {
  AtomicBitmap bits(128 + 3);
  bits.set_range(0, 131);
  EXPECT_EQ(bits.count(), 131u);
  EXPECT_TRUE(bits.all_set(0, 131));
  EXPECT_EQ(bits.first_clear(0, 131), 131u);
}

TEST(AtomicBitmapTest, SetIsIdempotent) {
  AtomicBitmap bits(64);
  bits.set_range(3, 9);
  bits.set_range(5, 12);
  EXPECT_EQ(bits.count(), 9u);
  EXPECT_EQ(bits.first_clear(3, 64), 12u);
}

TEST(AtomicBitmapTest, ConcurrentSettersLoseNoBit) {
  constexpr uint64_t kBits = 64 * 100 + 17;
  AtomicBitmap bits(kBits);
  std::vector<std::thread> threads;
  // Interleaved single bits: every word is written by every thread at once.
  for (uint64_t t = 0; t < 4; ++t) {
    threads.emplace_back([&bits, t] {
      for (uint64_t b = t; b < kBits; b += 4) bits.set_range(b, b + 1);
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(bits.count(), kBits);
  EXPECT_TRUE(bits.all_set(0, kBits));
}

}  // namespace
}  // namespace lazyblock
