// The persistent chunk cache over a real file store, with the fault layer
// between them standing in for a misbehaving upstream. A second
// DiskCacheStore on the same directory stands in for a second process.
#include "storage/disk_cache_store.h"

#include <gtest/gtest.h>

#include <fstream>
#include <optional>
#include <thread>

#include "common/units.h"
#include "storage/fault_store.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

using testing::first_pattern_mismatch;
using testing::make_pattern;

constexpr uint64_t kSeed = 41;
constexpr uint64_t kChunk = 64 * kKiB;
constexpr uint64_t kObjectSize = 3 * kChunk + 1000;  // the last chunk is short
const std::string kKey = "build/memfile";

class DiskCacheStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch_->path());
    ASSERT_TRUE(files) << files.status().to_string();
    ASSERT_TRUE((*files)->put(kKey, make_pattern(kSeed, 0, kObjectSize), IoContext{}).is_ok());
    upstream_ = std::make_shared<FaultStore>(*files);
    cache_ = process();
  }

  // A cache on the shared directory over its own view of the upstream, as
  // another process would have.
  std::shared_ptr<DiskCacheStore> process(std::shared_ptr<ObjectStore> upstream = nullptr,
                                          uint64_t max_bytes = 1 * kGiB) {
    DiskCacheOptions options;
    options.dir = scratch_->path() / "cache";
    options.chunk_size = kChunk;
    options.max_bytes = max_bytes;
    Result<std::shared_ptr<DiskCacheStore>> store =
        DiskCacheStore::open(upstream ? upstream : upstream_, options);
    EXPECT_TRUE(store) << store.status().to_string();
    return store ? *store : nullptr;
  }

  // An upstream on which every request fails: a cache over it proves that
  // what it serves came from the directory.
  std::shared_ptr<FaultStore> dead_upstream() {
    Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch_->path());
    auto dead = std::make_shared<FaultStore>(*files);
    dead->set(*FaultSpec::parse("fail-open"));
    return dead;
  }

  // Reads [offset, offset + length) through `store` to its end, checking the
  // bytes; returns the status the stream ended with.
  static Status read_range(ObjectStore& store, uint64_t offset, uint64_t length,
                           uint64_t* delivered = nullptr) {
    auto reader = store.open_range(kKey, offset, length, IoContext{});
    if (!reader) return reader.status();
    std::vector<std::byte> buffer(10000);
    uint64_t at = offset;
    for (;;) {
      Result<size_t> got = (*reader)->read(buffer);
      if (!got) return got.status();
      if (*got == 0) break;
      const std::span<const std::byte> bytes = std::span(buffer).first(*got);
      if (first_pattern_mismatch(kSeed, at, bytes) != bytes.size()) {
        return Status::corruption("wrong bytes at " + std::to_string(at));
      }
      at += *got;
    }
    if (delivered != nullptr) *delivered = at - offset;
    return Status::ok();
  }

  bool cached_file_exists(uint64_t index) {
    return std::filesystem::exists(cache_->chunk_path(kKey, index));
  }

  // Files under the cache directory whose name marks them temporary.
  int temporary_files() {
    int count = 0;
    for (const auto& entry :
         std::filesystem::recursive_directory_iterator(scratch_->path() / "cache")) {
      if (entry.path().filename().string().find(".tmp.") != std::string::npos) ++count;
    }
    return count;
  }

  std::optional<testing::ScratchDir> scratch_;
  std::shared_ptr<FaultStore> upstream_;
  std::shared_ptr<DiskCacheStore> cache_;
};

TEST_F(DiskCacheStoreTest, ASecondProcessIsServedFromTheDirectoryAlone) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  EXPECT_EQ(cache_->counters().chunks_published, 4u);
  EXPECT_EQ(upstream_->opens(), 1);
  EXPECT_EQ(temporary_files(), 0);

  auto dead = dead_upstream();
  auto second = process(dead);
  uint64_t delivered = 0;
  ASSERT_TRUE(read_range(*second, 0, kObjectSize, &delivered).is_ok());
  EXPECT_EQ(delivered, kObjectSize);
  ASSERT_TRUE(read_range(*second, kChunk + 5, 2 * kChunk, &delivered).is_ok());
  EXPECT_EQ(delivered, 2 * kChunk);
  EXPECT_EQ(dead->opens(), 0);
  EXPECT_EQ(second->counters().chunk_hits, 4u + 3u);
  // A range past the end is refused from the cache as the store would.
  EXPECT_EQ(second->open_range(kKey, kObjectSize + 1, 10, IoContext{}).status().code(),
            StatusCode::kOutOfRange);
}

TEST_F(DiskCacheStoreTest, StreamsCoveringPartsOfAChunkCompleteItTogether) {
  ASSERT_TRUE(read_range(*cache_, 0, 30000).is_ok());
  EXPECT_FALSE(cached_file_exists(0));
  ASSERT_TRUE(read_range(*cache_, 30000, kChunk - 30000 + 100).is_ok());
  EXPECT_TRUE(cached_file_exists(0));
  EXPECT_FALSE(cached_file_exists(1));  // only its first 100 bytes came
  auto dead = dead_upstream();
  ASSERT_TRUE(read_range(*process(dead), 0, kChunk).is_ok());
  EXPECT_EQ(dead->opens(), 0);
}

TEST_F(DiskCacheStoreTest, AStreamCutShortPublishesNothingAndLeavesNoTemporaryFile) {
  {
    auto reader = cache_->open_range(kKey, 0, kObjectSize, IoContext{});
    ASSERT_TRUE(reader);
    std::vector<std::byte> buffer(10000);
    ASSERT_TRUE((*reader)->read(buffer));  // then the caller goes away
  }
  EXPECT_FALSE(cached_file_exists(0));
  cache_.reset();  // the process ends
  EXPECT_EQ(temporary_files(), 0);
}

TEST_F(DiskCacheStoreTest, ATruncatedResponseIsNeverPublished) {
  upstream_->set(*FaultSpec::parse("short=100000"));
  uint64_t delivered = 0;
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize, &delivered).is_ok());
  EXPECT_EQ(delivered, 100000u);  // the caller sees the shortfall
  EXPECT_TRUE(cached_file_exists(0));
  EXPECT_FALSE(cached_file_exists(1));  // 100000 lies inside chunk 1
  // Upstream healthy again: the rest is fetched and published.
  upstream_->set(FaultSpec{});
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  for (uint64_t index = 0; index < 4; ++index) EXPECT_TRUE(cached_file_exists(index)) << index;
}

TEST_F(DiskCacheStoreTest, ALastChunkIsPublishedOnlyAfterACleanEnd) {
  // The store claims the object ends at 2 chunks + 10 bytes; it goes on.
  upstream_->set(*FaultSpec::parse("size=" + std::to_string(2 * kChunk + 10)));
  auto reader = cache_->open_range(kKey, 0, kObjectSize, IoContext{});
  ASSERT_TRUE(reader);
  EXPECT_EQ((*reader)->range_length(), 2 * kChunk + 10);
  std::vector<std::byte> buffer(10000);
  uint64_t delivered = 0;
  for (;;) {
    Result<size_t> got = (*reader)->read(buffer);
    ASSERT_TRUE(got);
    if (*got == 0 || delivered >= (*reader)->range_length()) break;
    delivered += *got;
  }
  EXPECT_TRUE(cached_file_exists(1));
  EXPECT_FALSE(cached_file_exists(2)) << "the misreported last chunk was published";
}

TEST_F(DiskCacheStoreTest, CorruptFilesAreDroppedAndFetchedAgain) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  const std::filesystem::path flipped = cache_->chunk_path(kKey, 1);
  {
    std::fstream file(flipped, std::ios::in | std::ios::out | std::ios::binary);
    file.seekp(777);
    file.put('\x5a' ^ static_cast<char>(make_pattern(kSeed, kChunk + 777, 1)[0]));
  }
  const std::filesystem::path cut = cache_->chunk_path(kKey, 2);
  std::filesystem::resize_file(cut, std::filesystem::file_size(cut) - 5);
  const std::filesystem::path garbage = cache_->chunk_path(kKey, 3);
  std::ofstream(garbage, std::ios::trunc) << "not a chunk at all, but long enough to hold a trailer";

  auto second = process();
  // Each damaged file is caught when a read starts in its chunk, and the
  // read is served right from upstream.
  for (uint64_t index : {1, 2, 3}) {
    ASSERT_TRUE(read_range(*second, index * kChunk + 10, 100).is_ok()) << index;
  }
  EXPECT_EQ(second->counters().corrupt_dropped, 3u);
  EXPECT_EQ(upstream_->opens(), 1 + 3);
  ASSERT_TRUE(read_range(*second, 0, kObjectSize).is_ok());
  // Published afresh, and good: a third process is served from them alone.
  auto dead = dead_upstream();
  ASSERT_TRUE(read_range(*process(dead), 0, kObjectSize).is_ok());
  EXPECT_EQ(dead->opens(), 0);
}

TEST_F(DiskCacheStoreTest, EvictsTheLeastRecentlyUsedBeyondItsBudget) {
  // Room for about two and a half full chunks.
  cache_ = process(nullptr, 5 * kChunk / 2);
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  EXPECT_GT(cache_->counters().evicted, 0u);
  uint64_t total = 0;
  for (const auto& entry :
       std::filesystem::recursive_directory_iterator(scratch_->path() / "cache")) {
    if (entry.is_regular_file()) total += entry.file_size();
  }
  EXPECT_LE(total, 5 * kChunk / 2);
  EXPECT_FALSE(cached_file_exists(0));  // the oldest went first
  EXPECT_TRUE(cached_file_exists(3));   // the newest stays
}

TEST_F(DiskCacheStoreTest, TwoProcessesFillingTheSameChunksAtOnce) {
  auto other = process();
  Status first, second;
  std::thread a([&] { first = read_range(*cache_, 0, kObjectSize); });
  std::thread b([&] { second = read_range(*other, 0, kObjectSize); });
  a.join();
  b.join();
  EXPECT_TRUE(first.is_ok()) << first.to_string();
  EXPECT_TRUE(second.is_ok()) << second.to_string();
  auto dead = dead_upstream();
  ASSERT_TRUE(read_range(*process(dead), 0, kObjectSize).is_ok());
  EXPECT_EQ(dead->opens(), 0);
}

TEST_F(DiskCacheStoreTest, AnUnusableDirectoryIsAClearError) {
  const std::filesystem::path file = scratch_->path() / "plain-file";
  std::ofstream(file) << "x";
  DiskCacheOptions options;
  options.dir = file / "cache";
  Result<std::shared_ptr<DiskCacheStore>> store = DiskCacheStore::open(upstream_, options);
  ASSERT_FALSE(store);
  EXPECT_NE(store.status().message().find("cache-dir"), std::string::npos)
      << store.status().to_string();
}

}  // namespace
}  // namespace lazyblock
