#include "chunk/cache_copy.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "testing/pattern.h"
#include "testing/unnamed_files.h"
#include "testing/vector_sink.h"

namespace lazyblock {
namespace {

constexpr uint64_t kBlock = 4096;
constexpr uint64_t kUnit = BlockCache::kUnitSize;
constexpr uint64_t kSize = 3 * kUnit;
constexpr uint32_t kSeed = 7;
constexpr char kKey[] = "build/memfile";

// The chunker's side, over a real cache: a fetch writes the pattern's bytes
// of the blocks not cached, unless `fetches_write` is off: then it only
// marks them, as a fetch into a file that keeps failing would leave them.
class PatternRanges final : public CachedRanges {
 public:
  explicit PatternRanges(BlockCache& cache) : cache_(cache) {}

  Result<BlockCache::Pin> fetch_pinned(uint64_t offset, uint64_t end) override {
    BlockCache::Pin pin = cache_.pin(offset, end);
    for (uint64_t block = offset / kBlock * kBlock; block < end; block += kBlock) {
      if (cache_.is_cached(block, block + kBlock)) continue;
      ++fetched_blocks;
      if (fetches_write) {
        const Status written = cache_.write(block, testing::make_pattern(kSeed, block, kBlock));
        if (!written.is_ok()) return written;
      }
      cache_.mark_cached(block, block + kBlock);
    }
    return pin;
  }

  void drop_lost(uint64_t offset, uint64_t end) override {
    lost.emplace_back(offset, end);
    cache_.drop(offset, end);
  }

  bool fetches_write = true;
  uint64_t fetched_blocks = 0;
  std::vector<std::pair<uint64_t, uint64_t>> lost;

 private:
  BlockCache& cache_;
};

// A sink during whose first write the cache is dropped (as when a stream
// finds the file cut short and drops everything).
class DroppingSink final : public ByteSink {
 public:
  explicit DroppingSink(BlockCache& cache) : cache_(cache) {}
  Status write(std::span<const std::byte> data) override {
    if (!dropped_) cache_.drop(0, kBlock);
    dropped_ = true;
    bytes.insert(bytes.end(), data.begin(), data.end());
    return Status::ok();
  }
  std::vector<std::byte> bytes;

 private:
  BlockCache& cache_;
  bool dropped_ = false;
};

class CacheCopyTest : public ::testing::Test {
 protected:
  void SetUp() override { open(kSize); }

  // A cache of `size` bytes, its fetches, and its file, for a test to cut.
  void open(uint64_t size) {
    auto created = BlockCache::create(size, kBlock, ::testing::TempDir());
    ASSERT_TRUE(created) << created.status().to_string();
    cache_ = std::move(created).value();
    ranges_ = std::make_unique<PatternRanges>(*cache_);
    file_ = testing::unnamed_file_of_size(::getpid(), BlockCache::file_size_for(size));
    ASSERT_FALSE(file_.empty());
  }

  // Caches everything, then cuts the cache's file to `length` bytes.
  void fill_and_cut(uint64_t length) {
    ASSERT_TRUE(ranges_->fetch_pinned(0, kSize));
    ASSERT_EQ(::truncate(file_.c_str(), static_cast<off_t>(length)), 0) << std::strerror(errno);
  }

  std::unique_ptr<BlockCache> cache_;
  std::unique_ptr<PatternRanges> ranges_;
  std::filesystem::path file_;
};

TEST_F(CacheCopyTest, ReadsAndWritesWhatIsFetched) {
  std::vector<std::byte> buffer(kUnit);
  Result<size_t> read = read_through_cache(*ranges_, *cache_, kKey, buffer, kUnit / 2);
  ASSERT_TRUE(read) << read.status().to_string();
  EXPECT_EQ(*read, kUnit);
  EXPECT_EQ(testing::first_pattern_mismatch(kSeed, kUnit / 2, buffer), kUnit);
  testing::VectorSink sink;
  Result<size_t> written = write_through_cache(*ranges_, *cache_, kKey, sink, 0, kSize);
  ASSERT_TRUE(written) << written.status().to_string();
  EXPECT_EQ(*written, kSize);
  EXPECT_EQ(testing::first_pattern_mismatch(kSeed, 0, sink.bytes), kSize);
  EXPECT_EQ(ranges_->fetched_blocks, kSize / kBlock) << "a block fetched twice";
  EXPECT_TRUE(ranges_->lost.empty());
}

// The bytes before the cut go out, the rest is fetched once more and follows.
TEST_F(CacheCopyTest, AWriteFromACutFileFetchesTheRestOnceAndEndsByteExact) {
  fill_and_cut(kUnit);
  const uint64_t fetched = ranges_->fetched_blocks;
  testing::VectorSink sink;
  Result<size_t> written = write_through_cache(*ranges_, *cache_, kKey, sink, 0, kSize);
  ASSERT_TRUE(written) << written.status().to_string();
  EXPECT_EQ(*written, kSize);
  EXPECT_EQ(testing::first_pattern_mismatch(kSeed, 0, sink.bytes), kSize);
  ASSERT_EQ(ranges_->lost.size(), 1u);
  EXPECT_EQ(ranges_->lost[0].first, kUnit) << "not dropped where the copy stopped";
  EXPECT_GT(ranges_->fetched_blocks, fetched);
}

TEST_F(CacheCopyTest, AReadFromACutFileIsFetchedOnceMoreAndByteExact) {
  fill_and_cut(kUnit);
  std::vector<std::byte> buffer(kUnit);
  Result<size_t> read = read_through_cache(*ranges_, *cache_, kKey, buffer, 2 * kUnit);
  ASSERT_TRUE(read) << read.status().to_string();
  EXPECT_EQ(testing::first_pattern_mismatch(kSeed, 2 * kUnit, buffer), kUnit);
  EXPECT_EQ(ranges_->lost.size(), 1u);
}

// A second failure is the caller's: an I/O error naming the object and the
// range, for a read and for a write.
TEST_F(CacheCopyTest, ASecondFailureIsAnIoErrorNamingTheObjectAndTheRange) {
  fill_and_cut(kUnit);
  ranges_->fetches_write = false;
  std::vector<std::byte> buffer(kBlock);
  Result<size_t> read = read_through_cache(*ranges_, *cache_, kKey, buffer, 2 * kUnit);
  ASSERT_FALSE(read);
  EXPECT_EQ(read.status().code(), StatusCode::kIoError);
  EXPECT_NE(read.status().message().find(kKey), std::string::npos) << read.status().to_string();
  EXPECT_NE(read.status().message().find("could not be read at ["), std::string::npos)
      << read.status().to_string();
  testing::VectorSink sink;
  Result<size_t> written = write_through_cache(*ranges_, *cache_, kKey, sink, 0, kSize);
  ASSERT_FALSE(written);
  EXPECT_EQ(written.status().code(), StatusCode::kIoError);
  EXPECT_NE(written.status().message().find(kKey), std::string::npos)
      << written.status().to_string();
  EXPECT_EQ(sink.bytes.size(), kUnit) << "not the bytes before the cut, and only those";
}

// Bytes that went out to a sink cannot be taken back: a drop during the
// write (they may be the hole it left) is an I/O error, not a retry.
TEST_F(CacheCopyTest, ADropDuringAWriteIsAnIoError) {
  DroppingSink sink(*cache_);
  Result<size_t> written = write_through_cache(*ranges_, *cache_, kKey, sink, 0, kUnit);
  ASSERT_FALSE(written);
  EXPECT_EQ(written.status().code(), StatusCode::kIoError);
  EXPECT_NE(written.status().message().find(kKey), std::string::npos)
      << written.status().to_string();
  EXPECT_EQ(sink.bytes.size(), kUnit) << "written again after the drop";
}

TEST_F(CacheCopyTest, CopyIfCachedCopiesWhatIsCachedAndNothingElse) {
  std::vector<std::byte> buffer(2 * kBlock);
  EXPECT_FALSE(copy_if_cached(*cache_, buffer, kUnit)) << "nothing is cached yet";
  EXPECT_EQ(ranges_->fetched_blocks, 0u) << "it fetched";
  ASSERT_TRUE(ranges_->fetch_pinned(kUnit, kUnit + kBlock));
  EXPECT_FALSE(copy_if_cached(*cache_, buffer, kUnit)) << "half of it is cached";
  ASSERT_TRUE(ranges_->fetch_pinned(kUnit, kUnit + 2 * kBlock));
  ASSERT_TRUE(copy_if_cached(*cache_, buffer, kUnit));
  EXPECT_EQ(testing::first_pattern_mismatch(kSeed, kUnit, buffer), buffer.size());
  fill_and_cut(kUnit);
  EXPECT_FALSE(copy_if_cached(*cache_, buffer, 2 * kUnit)) << "past the cut";
  ASSERT_TRUE(copy_if_cached(*cache_, buffer, kUnit - 2 * kBlock)) << "before the cut";
  EXPECT_EQ(testing::first_pattern_mismatch(kSeed, kUnit - 2 * kBlock, buffer), buffer.size());
}

// Each race opens a cache of its own size.
class CacheCopyRaceTest : public CacheCopyTest {
 protected:
  void SetUp() override {}
};

// A cache file cut short, then extended again by a fetch's write past the
// cut before any reader met the cut: the blocks in between read as zeros,
// their bits still set. A reader copying them meanwhile (a page fault's
// fast path, which installs what it copies into a VM for good) must get
// either no copy or the right bytes, never those zeros. Each round races
// one reader against that write; the interleavings differ from round to
// round.
TEST_F(CacheCopyRaceTest, CopyIfCachedNeverCopiesTheZerosOfACutFileExtendedAgain) {
  constexpr uint64_t kSmall = 1024 * 1024;
  constexpr uint64_t kLast = kSmall - kBlock;
  ASSERT_NO_FATAL_FAILURE(open(kSmall));
  BlockCache& cache = *cache_;
  PatternRanges& ranges = *ranges_;
  uint64_t copies = 0;
  uint64_t wrong = 0;
  for (int round = 0; round < 200 && wrong == 0; ++round) {
    cache.drop(0, kSmall);
    ASSERT_TRUE(ranges.fetch_pinned(0, kLast)) << "round " << round;  // all but the last block
    ASSERT_EQ(::truncate(file_.c_str(), static_cast<off_t>(kBlock)), 0) << std::strerror(errno);
    std::atomic<bool> reading{false};
    std::atomic<bool> written{false};
    std::thread reader([&] {
      std::vector<std::byte> buffer(kBlock);
      reading.store(true);
      for (uint64_t block = 1; !written.load() || block % 8 != 0; ++block) {
        const uint64_t offset = (block % (kLast / kBlock - 1) + 1) * kBlock;
        if (!copy_if_cached(cache, buffer, offset)) continue;
        ++copies;
        if (testing::first_pattern_mismatch(kSeed, offset, buffer) != kBlock) ++wrong;
      }
    });
    while (!reading.load()) std::this_thread::yield();
    const Status status = cache.write(kLast, testing::make_pattern(kSeed, kLast, kBlock));
    written.store(true);
    reader.join();
    ASSERT_TRUE(status.is_ok()) << status.to_string();
  }
  EXPECT_EQ(wrong, 0u) << "of " << copies << " copies";
}

// The cut lands while a write is under way, after its check before: the
// pwrite then extends the cut file over blocks still marked cached, whose
// holes read as zeros until the write's check after drops them. Each round
// caches every block but the last, then writes that one over and over
// while another thread cuts the file once, at a moment that varies, and at
// once copies the cached blocks: a copy that reads true is the pattern.
TEST_F(CacheCopyRaceTest, CopyIfCachedNeverCopiesZerosWhenTheCutLandsDuringAWrite) {
  constexpr uint64_t kSmall = 256 * 1024;
  constexpr uint64_t kLast = kSmall - kBlock;
  constexpr int kRounds = 500;
  ASSERT_NO_FATAL_FAILURE(open(kSmall));
  BlockCache& cache = *cache_;
  PatternRanges& ranges = *ranges_;
  const std::vector<std::byte> last = testing::make_pattern(kSeed, kLast, kBlock);
  uint64_t copies = 0;
  uint64_t wrong = 0;
  int bad_rounds = 0;
  for (int round = 0; round < kRounds; ++round) {
    const uint64_t wrong_before = wrong;
    cache.drop(0, kSmall);
    ASSERT_TRUE(ranges.fetch_pinned(0, kLast)) << "round " << round;
    const uint64_t drops = cache.drops();
    std::atomic<bool> writing{false};
    std::atomic<bool> done{false};
    std::atomic<int> cut_error{0};
    std::thread cutter([&] {
      while (!writing.load()) std::this_thread::yield();
      // 0 to 20 us into the writes, a different while each round, so that
      // the cut lands at every point of their loop.
      const auto cut_at =
          std::chrono::steady_clock::now() + std::chrono::nanoseconds((round * 7919) % 20000);
      while (std::chrono::steady_clock::now() < cut_at) {
      }
      if (::truncate(file_.c_str(), static_cast<off_t>(kBlock)) != 0) {
        cut_error.store(errno);
        return;
      }
      std::vector<std::byte> buffer(kBlock);
      for (uint64_t block = 0; !done.load(); ++block) {
        const uint64_t offset = (block % (kLast / kBlock - 1) + 1) * kBlock;
        if (!copy_if_cached(cache, buffer, offset)) continue;
        ++copies;
        if (testing::first_pattern_mismatch(kSeed, offset, buffer) != kBlock) ++wrong;
      }
    });
    writing.store(true);
    // Until the cut is found (and a little after, for the drop to land).
    Status status;
    for (int after = 0; after < 4 && status.is_ok() && cut_error.load() == 0;) {
      status = cache.write(kLast, last);
      if (cache.drops() != drops) ++after;
    }
    done.store(true);
    cutter.join();
    ASSERT_TRUE(status.is_ok()) << status.to_string();
    ASSERT_EQ(cut_error.load(), 0) << std::strerror(cut_error.load());
    if (wrong != wrong_before) ++bad_rounds;
  }
  EXPECT_EQ(wrong, 0u) << "of " << copies << " copies; in " << bad_rounds << " of " << kRounds
                       << " rounds";
}

}  // namespace
}  // namespace lazyblock
