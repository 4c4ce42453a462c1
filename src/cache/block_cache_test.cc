#include "cache/block_cache.h"

#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>
#include <vector>

#include "common/byte_sink.h"
#include "common/unique_fd.h"
#include "testing/pattern.h"
#include "testing/unnamed_files.h"
#include "testing/vector_sink.h"

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
  EXPECT_NE(created.status().message().find("/nonexistent/lazyblock-cache-dir"), std::string::npos)
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

constexpr uint64_t kUnit = BlockCache::kUnitSize;

// Fills [offset, end) with pattern 5 and marks it cached.
void fill(BlockCache& cache, uint64_t offset, uint64_t end) {
  ASSERT_TRUE(cache.write(offset, make_pattern(5, offset, end - offset)).is_ok());
  cache.mark_cached(offset, end);
}

// Bytes of the file under `cache` allocated on disk, read through the
// descriptor the process holds (the file has no name).
// The /proc/self/fd path of `cache`'s unnamed file, or "".
std::string cache_file_of(const BlockCache& cache) {
  return testing::unnamed_file_of_size(::getpid(), BlockCache::file_size_for(cache.size()));
}

uint64_t allocated_bytes_of_unnamed(const std::filesystem::path& dir) {
  uint64_t total = 0;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator("/proc/self/fd", error)) {
    std::error_code link_error;
    const std::string target = std::filesystem::read_symlink(entry.path(), link_error).string();
    if (link_error || target.rfind(dir.string(), 0) != 0 ||
        target.find("(deleted)") == std::string::npos) {
      continue;
    }
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      total += static_cast<uint64_t>(st.st_blocks) * 512;
    }
  }
  return total;
}

TEST(BlockCacheTest, ReleaseGivesBackCachedBlocksAndTheirSpace) {
  const std::filesystem::path dir = std::filesystem::path(temp_dir()) / "release";
  std::filesystem::create_directories(dir);
  auto created = BlockCache::create(2 * kUnit + 100, 4096, dir);
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  fill(cache, 0, 2 * kUnit + 100);
  const uint64_t before = allocated_bytes_of_unnamed(dir);
  EXPECT_GE(before, 2 * kUnit);
  // Whole blocks only: the partial ones at the range's edges stay.
  EXPECT_EQ(cache.release(100, kUnit + 4096 + 100), kUnit);
  EXPECT_TRUE(cache.is_cached(0, 4096));
  EXPECT_FALSE(cache.is_cached(4096, 4097));
  EXPECT_FALSE(cache.is_cached(kUnit, kUnit + 4096));
  EXPECT_TRUE(cache.is_cached(kUnit + 4096, 2 * kUnit + 100));
  EXPECT_LE(allocated_bytes_of_unnamed(dir), before - kUnit);
  // The short last block goes with a range reaching the end.
  EXPECT_GT(cache.release(2 * kUnit - 4096, 2 * kUnit + 100), 0u);
  EXPECT_FALSE(cache.is_cached(2 * kUnit, 2 * kUnit + 100));
  // What is still cached reads back right.
  EXPECT_EQ(first_pattern_mismatch(5, 0, cache.slice(0, 4096)), 4096u);
  std::filesystem::remove_all(dir);
}

TEST(BlockCacheTest, PinnedUnitsAreNotGivenBack) {
  auto created = BlockCache::create(2 * kUnit, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  fill(cache, 0, 2 * kUnit);
  BlockCache::Pin pin = cache.pin(kUnit - 4096, kUnit + 4096);  // both units
  EXPECT_EQ(cache.release(0, 2 * kUnit), 0u);
  EXPECT_TRUE(cache.is_cached(0, 2 * kUnit));
  BlockCache::Pin moved = std::move(pin);
  pin.reset();  // a moved-from pin holds nothing
  EXPECT_EQ(cache.release(0, 2 * kUnit), 0u);
  moved.reset();
  EXPECT_EQ(cache.release(0, 2 * kUnit), 2 * kUnit);
  EXPECT_FALSE(cache.is_cached(0, 1));
}

// A view handed out stays pinned for its thread until the thread's next.
TEST(BlockCacheTest, AThreadHoldsItsLastViewUntilItsNext) {
  auto created = BlockCache::create(2 * kUnit, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  fill(cache, 0, 2 * kUnit);
  cache.hold_for_thread(0, 4096);
  cache.hold_for_thread(8192, 4096 * 4);  // within the same unit: the same hold
  EXPECT_EQ(cache.release(0, kUnit), 0u);
  std::thread other([&] { EXPECT_EQ(cache.release(0, kUnit), 0u); });
  other.join();
  cache.hold_for_thread(kUnit, kUnit + 4096);  // the next view: the first is let go
  EXPECT_EQ(cache.release(0, kUnit), kUnit);
  EXPECT_EQ(cache.release(kUnit, 2 * kUnit), 0u);
  // A thread's hold ends with the thread.
  std::thread holder([&] { cache.hold_for_thread(0, 4096); });
  holder.join();
  EXPECT_EQ(cache.release(0, kUnit), 0u);  // nothing cached there any more
  fill(cache, 0, kUnit);
  EXPECT_EQ(cache.release(0, kUnit), kUnit);
}

// Readers pin, look, copy and check while another thread gives blocks back
// and a writer fetches them again: a reader that found its block cached
// under its pin never copies anything but the block's bytes.
TEST(BlockCacheTest, PinnedReadersNeverSeeAPunchedBlock) {
  constexpr uint64_t kUnits = 4;
  constexpr uint64_t kBlocks = kUnits * kUnit / 4096;
  auto created = BlockCache::create(kUnits * kUnit, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  std::atomic<bool> done{false};
  std::atomic<uint64_t> bad{0};
  std::atomic<uint64_t> read{0};
  std::vector<std::thread> threads;
  threads.emplace_back([&] {  // the writer: refills what is missing
    while (!done.load()) {
      for (uint64_t b = cache.first_uncached(0, cache.size()) / 4096; b < kBlocks;
           b = cache.first_uncached(b * 4096, cache.size()) / 4096) {
        const uint64_t end = cache.first_cached(b * 4096, cache.size());
        ASSERT_TRUE(cache.write(b * 4096, make_pattern(6, b * 4096, end - b * 4096)).is_ok());
        cache.mark_cached(b * 4096, end);
        b = end / 4096;
        if (b >= kBlocks) break;
      }
    }
  });
  threads.emplace_back([&] {  // the evicter: gives back units once whole
    std::mt19937_64 rng(1);
    while (!done.load()) {
      const uint64_t unit = rng() % kUnits;
      if (cache.is_cached(unit * kUnit, (unit + 1) * kUnit)) {
        cache.release(unit * kUnit, (unit + 1) * kUnit);
      }
    }
  });
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      std::mt19937_64 rng(r + 10);
      std::vector<std::byte> buffer(4096);
      // Until this reader has checked 5000 blocks found cached.
      for (int checked = 0; checked < 5000;) {
        const uint64_t offset = rng() % kBlocks * 4096;
        BlockCache::Pin pin = cache.pin(offset, offset + 4096);
        if (!cache.is_cached(offset, offset + 4096)) continue;
        ASSERT_TRUE(cache.copy_out(offset, buffer).is_ok());
        if (first_pattern_mismatch(6, offset, buffer) != 4096) ++bad;
        ++read;
        ++checked;
      }
    });
  }
  for (size_t t = 2; t < threads.size(); ++t) threads[t].join();
  done.store(true);
  threads[0].join();
  threads[1].join();
  EXPECT_EQ(bad.load(), 0u);
  EXPECT_GT(read.load(), 0u);
}

// A small filesystem of the test's own (we run as root), unmounted at the end.
class FullFilesystemTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = std::filesystem::path(temp_dir()) / ("small-" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
    // Room for two units and a little.
    if (::mount("lazyblock-test", dir_.c_str(), "tmpfs", 0, "size=9m") != 0) {
      GTEST_SKIP() << "cannot mount a tmpfs at " << dir_ << ": " << std::strerror(errno);
    }
    mounted_ = true;
  }
  void TearDown() override {
    if (mounted_) ::umount2(dir_.c_str(), MNT_DETACH);
    std::filesystem::remove(dir_);
  }
  std::filesystem::path dir_;
  bool mounted_ = false;
};

TEST_F(FullFilesystemTest, AWriteGivesBackTheLeastRecentlyUsedUnpinnedUnit) {
  auto created = BlockCache::create(4 * kUnit, 4096, dir_);
  ASSERT_TRUE(created) << created.status().to_string();
  BlockCache& cache = **created;
  fill(cache, 0, kUnit);
  fill(cache, kUnit, 2 * kUnit);
  // The filesystem fills up during unit 2: unit 0, filled first, goes.
  ASSERT_TRUE(cache.write(2 * kUnit, make_pattern(5, 2 * kUnit, kUnit)).is_ok());
  cache.mark_cached(2 * kUnit, 3 * kUnit);
  EXPECT_EQ(cache.evictions(), 1u);
  EXPECT_FALSE(cache.is_cached(0, 4096));
  EXPECT_TRUE(cache.is_cached(kUnit, 3 * kUnit));
  const uint64_t survivor = kUnit;
  cache.pin(survivor, survivor + 4096).reset();  // read now: the newest
  // Unit 2 is older than unit 1's read: the next write gives it back.
  ASSERT_TRUE(cache.write(3 * kUnit, make_pattern(5, 3 * kUnit, kUnit)).is_ok());
  cache.mark_cached(3 * kUnit, 4 * kUnit);
  EXPECT_TRUE(cache.is_cached(survivor, survivor + kUnit));
  EXPECT_FALSE(cache.is_cached(2 * kUnit, 3 * kUnit));
  EXPECT_EQ(first_pattern_mismatch(5, survivor, cache.slice(survivor, kUnit)), kUnit);
  EXPECT_EQ(first_pattern_mismatch(5, 3 * kUnit, cache.slice(3 * kUnit, kUnit)), kUnit);
}

TEST_F(FullFilesystemTest, AWriteFailsWhenEverythingCachedIsPinnedAndWorksOnceLetGo) {
  auto created = BlockCache::create(4 * kUnit, 4096, dir_);
  ASSERT_TRUE(created) << created.status().to_string();
  BlockCache& cache = **created;
  fill(cache, 0, kUnit);
  fill(cache, kUnit, 2 * kUnit);
  BlockCache::Pin pin = cache.pin(0, 2 * kUnit);
  const Status full = cache.write(2 * kUnit, make_pattern(5, 2 * kUnit, kUnit));
  ASSERT_FALSE(full.is_ok());
  EXPECT_NE(full.to_string().find("No space left on device"), std::string::npos)
      << full.to_string();
  EXPECT_TRUE(cache.is_cached(0, 2 * kUnit));
  pin.reset();
  ASSERT_TRUE(cache.write(2 * kUnit, make_pattern(5, 2 * kUnit, kUnit)).is_ok());
  cache.mark_cached(2 * kUnit, 3 * kUnit);
  EXPECT_EQ(first_pattern_mismatch(5, 2 * kUnit, cache.slice(2 * kUnit, kUnit)), kUnit);
}

// A file cut short and written again past the cut reads as zeros where it
// was cut, without a fault: the write that finds it short drops everything.
TEST(BlockCacheTest, AFileCutShortIsFoundByTheNextWrite) {
  auto created = BlockCache::create(3 * kUnit, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  fill(cache, 0, kUnit);
  const std::string fd_path = cache_file_of(cache);
  ASSERT_FALSE(fd_path.empty());
  ASSERT_EQ(::truncate(fd_path.c_str(), 0), 0) << std::strerror(errno);
  const uint64_t drops = cache.drops();
  fill(cache, kUnit, 2 * kUnit);
  EXPECT_GT(cache.drops(), drops);
  EXPECT_FALSE(cache.is_cached(0, 4096)) << "a block lost to the cut is still cached";
  EXPECT_EQ(cache_file_of(cache), fd_path) << "its size is not restored";
  EXPECT_TRUE(cache.is_cached(kUnit, 2 * kUnit)) << "what was written after is lost";
}

// The same when the write after the cut is of the object's last block, which
// extends the file back to the object's size: the cut is found all the same
// (a file that only reached the object's size again would hide it, and the
// blocks before it would read as zeros for good).
TEST(BlockCacheTest, AFileCutShortIsFoundByAWriteOfTheLastBlock) {
  auto created = BlockCache::create(3 * kUnit, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  fill(cache, 0, kUnit);
  const std::string fd_path = cache_file_of(cache);
  ASSERT_FALSE(fd_path.empty());
  ASSERT_EQ(::truncate(fd_path.c_str(), kUnit / 2), 0) << std::strerror(errno);
  const uint64_t drops = cache.drops();
  fill(cache, 2 * kUnit, 3 * kUnit);
  EXPECT_GT(cache.drops(), drops) << "the cut was not found";
  EXPECT_FALSE(cache.is_cached(kUnit / 2, kUnit)) << "a block lost to the cut is still cached";
  EXPECT_EQ(cache_file_of(cache), fd_path) << "its size is not restored";
  EXPECT_TRUE(cache.is_cached(2 * kUnit, 3 * kUnit)) << "what was written after is lost";
}

// A copy out of a map whose file was cut fails, every time: the fault is
// caught, and caught again (SIGBUS is unblocked after each), never fatal.
// A write from the map to a sink stops where the file ends, the bytes
// before the cut written: a file descriptor's (straight from the map: the
// kernel's EFAULT) and any other's (through a guarded copy).
TEST(BlockCacheTest, CopiesOutOfACutFileFailEveryTimeAndTheProcessLives) {
  auto created = BlockCache::create(kUnit, 4096, temp_dir());
  ASSERT_TRUE(created);
  BlockCache& cache = **created;
  fill(cache, 0, kUnit);
  const std::string fd_path = cache_file_of(cache);
  ASSERT_FALSE(fd_path.empty());
  ASSERT_EQ(::truncate(fd_path.c_str(), 4096), 0) << std::strerror(errno);
  std::vector<std::byte> buffer(4096);
  EXPECT_TRUE(cache.copy_out(0, buffer).is_ok()) << "the first block is still in the file";
  for (int i = 0; i < 3; ++i) {
    const Status failed = cache.copy_out(8192, buffer);
    EXPECT_EQ(failed.code(), StatusCode::kIoError) << failed.to_string();
    EXPECT_NE(failed.message().find("[8192, 12288)"), std::string::npos) << failed.to_string();
  }
  const std::filesystem::path out = temp_dir() / "written";
  UniqueFd out_fd(::open(out.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600));
  ASSERT_TRUE(out_fd) << std::strerror(errno);
  FdSink file_sink(out_fd.get(), out.string());
  testing::VectorSink vector_sink;
  for (ByteSink* sink :
       {static_cast<ByteSink*>(&file_sink), static_cast<ByteSink*>(&vector_sink)}) {
    for (int i = 0; i < 2; ++i) {
      Result<size_t> written = sink->write_from_mapping(cache.slice(0, 4 * 4096));
      ASSERT_TRUE(written) << written.status().to_string();
      EXPECT_EQ(*written, 4096u) << "not stopped at the cut";
    }
  }
  // Each write gave the first block (the one before the cut), twice.
  ASSERT_EQ(vector_sink.bytes.size(), 2 * 4096u);
  std::vector<std::byte> in_file(2 * 4096);
  UniqueFd in_fd(::open(out.c_str(), O_RDONLY | O_CLOEXEC));
  ASSERT_EQ(::pread(in_fd.get(), in_file.data(), in_file.size(), 0),
            static_cast<ssize_t>(in_file.size()));
  for (const std::vector<std::byte>* bytes : {&vector_sink.bytes, &in_file}) {
    for (uint64_t copy = 0; copy < 2; ++copy) {
      EXPECT_EQ(first_pattern_mismatch(5, 0, std::span(*bytes).subspan(copy * 4096, 4096)), 4096u)
          << "wrong bytes";
    }
  }
  std::filesystem::remove(out);
}

}  // namespace
}  // namespace lazyblock
