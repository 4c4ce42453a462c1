#include "cache/block_cache.h"

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <thread>
#include <vector>

#include "testing/pattern.h"

namespace lazyblock {
namespace {

using testing::make_pattern;
using testing::first_pattern_mismatch;

std::filesystem::path temp_dir() { return ::testing::TempDir(); }

TEST(BlockCacheTest, NothingIsCachedAtFirst) {
  auto cache = BlockCache::create(10 * 4096 + 100, 4096, temp_dir());
  ASSERT_TRUE(cache) << cache.status().to_string();
  EXPECT_EQ((*cache)->size(), 10u * 4096 + 100);
  EXPECT_FALSE((*cache)->is_cached(0, 1));
  EXPECT_TRUE((*cache)->is_cached(5, 5));  // empty range
  EXPECT_EQ((*cache)->first_uncached(0, 4096), 0u);
  EXPECT_EQ((*cache)->first_cached(0, 10 * 4096), 10u * 4096);
  EXPECT_EQ((*cache)->cached_bytes(), 0u);
}

TEST(BlockCacheTest, WrittenAndMarkedBlocksReadBack) {
  auto created = BlockCache::create(8 * 4096, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  ASSERT_TRUE(cache.write(4096, make_pattern(1, 4096, 2 * 4096)).is_ok());
  cache.mark_cached(4096, 3 * 4096);
  EXPECT_TRUE(cache.is_cached(4096, 3 * 4096));
  EXPECT_TRUE(cache.is_cached(5000, 9000));
  EXPECT_FALSE(cache.is_cached(4000, 5000));  // touches block 0
  EXPECT_FALSE(cache.is_cached(3 * 4096 - 1, 3 * 4096 + 1));
  EXPECT_EQ(first_pattern_mismatch(1, 4096, cache.slice(4096, 2 * 4096)), 2u * 4096);
  EXPECT_EQ(cache.first_uncached(4096, 8 * 4096), 3u * 4096);
  EXPECT_EQ(cache.first_uncached(5000, 8 * 4096), 3u * 4096);
  EXPECT_EQ(cache.first_cached(0, 8 * 4096), 4096u);
  EXPECT_EQ(cache.first_cached(100, 8 * 4096), 4096u);
  EXPECT_EQ(cache.first_uncached(0, 8 * 4096), 0u);
  EXPECT_EQ(cache.first_uncached(100, 8 * 4096), 100u);  // its block is not cached
  EXPECT_EQ(cache.cached_bytes(), 2u * 4096);
}

TEST(BlockCacheTest, ShortLastBlockIsCachedUpToTheEnd) {
  const uint64_t size = 3 * 4096 + 10;
  auto created = BlockCache::create(size, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  ASSERT_TRUE(cache.write(3 * 4096, make_pattern(2, 3 * 4096, 10)).is_ok());
  cache.mark_cached(3 * 4096, size);
  EXPECT_TRUE(cache.is_cached(3 * 4096, size));
  EXPECT_FALSE(cache.is_cached(0, size));
  EXPECT_EQ(cache.cached_bytes(), 10u);
  EXPECT_EQ(first_pattern_mismatch(2, 3 * 4096, cache.slice(3 * 4096, 10)), 10u);
}

TEST(BlockCacheTest, EmptyObject) {
  auto created = BlockCache::create(0, 4096, temp_dir());
  ASSERT_TRUE(created);
  EXPECT_EQ((*created)->size(), 0u);
  EXPECT_TRUE((*created)->is_cached(0, 0));
  EXPECT_EQ((*created)->cached_bytes(), 0u);
}

TEST(BlockCacheTest, LargeSparseObjectCostsNoDiskUntilWritten) {
  const uint64_t size = uint64_t{64} << 30;  // 64 GiB, sparse
  auto created = BlockCache::create(size, 4096, temp_dir());
  ASSERT_TRUE(created) << created.status().to_string();
  BlockCache& cache = **created;
  ASSERT_TRUE(cache.write(size - 4096, make_pattern(3, size - 4096, 4096)).is_ok());
  cache.mark_cached(size - 4096, size);
  EXPECT_TRUE(cache.is_cached(size - 4096, size));
  EXPECT_FALSE(cache.is_cached(0, 4096));
  EXPECT_EQ(first_pattern_mismatch(3, size - 4096, cache.slice(size - 4096, 4096)), 4096u);
}

TEST(BlockCacheTest, MissingDirectoryIsAClearError) {
  auto created = BlockCache::create(4096, 4096, "/nonexistent/lazyblock-cache-dir");
  ASSERT_FALSE(created);
  EXPECT_NE(created.status().message().find("/nonexistent/lazyblock-cache-dir"),
            std::string::npos)
      << created.status().to_string();
}

TEST(BlockCacheTest, ZeroBlockSizeIsRefused) {
  EXPECT_FALSE(BlockCache::create(4096, 0, temp_dir()));
}

// Writers fill disjoint blocks while readers poll: a reader that sees a block
// cached must see all of its bytes (the bit is published after them).
TEST(BlockCacheTest, ReadersSeeWholeBlocksOnceMarked) {
  constexpr uint64_t kBlocks = 512;
  auto created = BlockCache::create(kBlocks * 4096, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  std::vector<std::thread> threads;
  for (int w = 0; w < 2; ++w) {
    threads.emplace_back([&cache, w] {
      for (uint64_t b = w; b < kBlocks; b += 2) {
        ASSERT_TRUE(cache.write(b * 4096, make_pattern(4, b * 4096, 4096)).is_ok());
        cache.mark_cached(b * 4096, (b + 1) * 4096);
      }
    });
  }
  std::atomic<int> bad{0};
  threads.emplace_back([&] {
    uint64_t seen = 0;
    while (seen < kBlocks) {
      seen = 0;
      for (uint64_t b = 0; b < kBlocks; ++b) {
        if (!cache.is_cached(b * 4096, (b + 1) * 4096)) continue;
        ++seen;
        if (first_pattern_mismatch(4, b * 4096, cache.slice(b * 4096, 4096)) != 4096) ++bad;
      }
    }
  });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
  EXPECT_EQ(cache.cached_bytes(), kBlocks * 4096);
}

}  // namespace
}  // namespace lazyblock
