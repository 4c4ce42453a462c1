// The persistent chunk cache over real file stores, with the fault layer
// between them standing in for a misbehaving upstream. A second
// DiskCacheStore on the same directory stands in for a second process.
#include "storage/disk_cache_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <fstream>
#include <optional>
#include <thread>

#include "common/unique_fd.h"
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
constexpr uint64_t kOtherSeed = 42;
constexpr uint64_t kChunk = 64 * kKiB;
constexpr uint64_t kObjectSize = 3 * kChunk + 1000;  // the last chunk is short
const std::string kKey = "build/memfile";

class DiskCacheStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    files_ = file_store("store");
    ASSERT_TRUE(files_->put(kKey, make_pattern(kSeed, 0, kObjectSize), IoContext{}).is_ok());
    upstream_ = std::make_shared<FaultStore>(files_);
    cache_ = process();
  }

  // A file store in scratch directory `name`, created if missing.
  std::shared_ptr<FileStore> file_store(const std::string& name) {
    std::filesystem::create_directories(scratch_->path() / name);
    Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch_->path() / name);
    EXPECT_TRUE(files) << files.status().to_string();
    return files ? *files : nullptr;
  }

  std::filesystem::path cache_dir() const { return scratch_->path() / "cache"; }

  // A cache on the shared directory over its own view of the upstream, as
  // another process would have.
  std::shared_ptr<DiskCacheStore> process(std::shared_ptr<ObjectStore> upstream = nullptr,
                                          uint64_t max_bytes = 1 * kGiB) {
    DiskCacheOptions options;
    options.dir = cache_dir();
    options.chunk_size = kChunk;
    options.max_bytes = max_bytes;
    Result<std::shared_ptr<DiskCacheStore>> store =
        DiskCacheStore::open(upstream ? upstream : upstream_, options);
    EXPECT_TRUE(store) << store.status().to_string();
    return store ? *store : nullptr;
  }

  // An upstream that answers stats (size and version) but whose every
  // stream fails at its first byte: a cache over it proves that the bytes
  // it serves came from the directory.
  std::shared_ptr<FaultStore> streams_dead_upstream() {
    return std::make_shared<FaultStore>(files_, *FaultSpec::parse("fail-after=0"));
  }

  // Reads [offset, offset + length) of `key` through `store` to its end,
  // checking the bytes against pattern `seed`; returns the status the
  // stream ended with.
  static Status read_range(ObjectStore& store, uint64_t offset, uint64_t length,
                           uint64_t* delivered = nullptr, uint64_t seed = kSeed,
                           const std::string& key = kKey) {
    auto reader = store.open_range(key, offset, length, IoContext{});
    if (!reader) return reader.status();
    std::vector<std::byte> buffer(10000);
    uint64_t at = offset;
    for (;;) {
      Result<size_t> got = (*reader)->read(buffer);
      if (!got) return got.status();
      if (*got == 0) break;
      const std::span<const std::byte> bytes = std::span(buffer).first(*got);
      if (first_pattern_mismatch(seed, at, bytes) != bytes.size()) {
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
    for (const auto& entry : std::filesystem::recursive_directory_iterator(cache_dir())) {
      if (entry.path().filename().string().find(".tmp.") != std::string::npos) ++count;
    }
    return count;
  }

  uint64_t bytes_in_cache() {
    uint64_t total = 0;
    for (const auto& entry : std::filesystem::recursive_directory_iterator(cache_dir())) {
      if (entry.is_regular_file()) total += entry.file_size();
    }
    return total;
  }

  std::optional<testing::ScratchDir> scratch_;
  std::shared_ptr<FileStore> files_;
  std::shared_ptr<FaultStore> upstream_;
  std::shared_ptr<DiskCacheStore> cache_;
};

TEST_F(DiskCacheStoreTest, ASecondProcessAsksTheStoreOnlyWhichVersionItHas) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  EXPECT_EQ(cache_->counters().chunks_published, 4u);
  EXPECT_EQ(upstream_->opens(), 1);
  EXPECT_EQ(temporary_files(), 0);

  auto dead = streams_dead_upstream();
  auto second = process(dead);
  uint64_t delivered = 0;
  ASSERT_TRUE(read_range(*second, 0, kObjectSize, &delivered).is_ok());
  EXPECT_EQ(delivered, kObjectSize);
  ASSERT_TRUE(read_range(*second, kChunk + 5, 2 * kChunk, &delivered).is_ok());
  EXPECT_EQ(delivered, 2 * kChunk);
  EXPECT_EQ(dead->opens(), 0);
  EXPECT_EQ(second->counters().chunk_hits, 4u + 3u);
  EXPECT_EQ(second->counters().upstream_stats, 1u) << "once per object per process";
  EXPECT_EQ(second->counters().upstream_ranges, 0u);
  // A range past the end is refused from the cache as the store would.
  EXPECT_EQ(second->open_range(kKey, kObjectSize + 1, 10, IoContext{}).status().code(),
            StatusCode::kOutOfRange);
}

TEST_F(DiskCacheStoreTest, AStatPassingThroughIsTheCheckOfTheVersion) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  auto dead = streams_dead_upstream();
  auto second = process(dead);
  Result<uint64_t> size = second->stat(kKey, IoContext{});
  ASSERT_TRUE(size) << size.status().to_string();
  EXPECT_EQ(*size, kObjectSize);
  ASSERT_TRUE(read_range(*second, 0, kObjectSize).is_ok());
  EXPECT_EQ(second->counters().upstream_stats, 1u);
  EXPECT_EQ(dead->opens(), 0);
}

TEST_F(DiskCacheStoreTest, AStoreThatCannotSayWhichVersionItHasServesNothingCached) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  auto down = std::make_shared<FaultStore>(files_, *FaultSpec::parse("fail-open"));
  EXPECT_EQ(read_range(*process(down), 0, kObjectSize).code(), StatusCode::kUnavailable);
}

TEST_F(DiskCacheStoreTest, TwoStoresSharingADirectoryEachGetTheirOwnBytes) {
  // Another store, with other bytes under the same key and of the same size.
  std::shared_ptr<FileStore> other_files = file_store("other-store");
  ASSERT_TRUE(
      other_files->put(kKey, make_pattern(kOtherSeed, 0, kObjectSize), IoContext{}).is_ok());
  auto other_upstream = std::make_shared<FaultStore>(other_files);

  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  auto other = process(other_upstream);
  uint64_t delivered = 0;
  ASSERT_TRUE(read_range(*other, 0, kObjectSize, &delivered, kOtherSeed).is_ok());
  EXPECT_EQ(delivered, kObjectSize);
  EXPECT_EQ(other->counters().chunk_hits, 0u);
  EXPECT_EQ(other_upstream->opens(), 1);  // every chunk a miss, in one stream
  EXPECT_NE(other->chunk_path(kKey, 0), cache_->chunk_path(kKey, 0));

  // Both stay cached side by side: later processes of each are served
  // their own store's bytes from the directory.
  auto dead = streams_dead_upstream();
  ASSERT_TRUE(read_range(*process(dead), 0, kObjectSize).is_ok());
  EXPECT_EQ(dead->opens(), 0);
  auto other_dead = std::make_shared<FaultStore>(other_files, *FaultSpec::parse("fail-after=0"));
  ASSERT_TRUE(read_range(*process(other_dead), 0, kObjectSize, nullptr, kOtherSeed).is_ok());
  EXPECT_EQ(other_dead->opens(), 0);

  // Even a file of one store put under the other's name is not served.
  std::filesystem::copy_file(cache_->chunk_path(kKey, 1), other->chunk_path(kKey, 1),
                             std::filesystem::copy_options::overwrite_existing);
  auto third = process(other_upstream);
  ASSERT_TRUE(read_range(*third, kChunk, kChunk, nullptr, kOtherSeed).is_ok());
  EXPECT_EQ(third->counters().stale_dropped, 1u);
  EXPECT_EQ(third->counters().chunk_hits, 0u);
}

TEST_F(DiskCacheStoreTest, AChunkFileCopiedUnderAnotherIndexIsAMiss) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  std::filesystem::copy_file(cache_->chunk_path(kKey, 0), cache_->chunk_path(kKey, 1),
                             std::filesystem::copy_options::overwrite_existing);
  auto second = process();
  ASSERT_TRUE(read_range(*second, kChunk, kChunk).is_ok());
  EXPECT_EQ(second->counters().stale_dropped, 1u);
  EXPECT_EQ(second->counters().upstream_ranges, 1u);
  EXPECT_EQ(upstream_->opens(), 1 + 1);
  // Fetched again and published right: a third process is served from it.
  auto dead = streams_dead_upstream();
  ASSERT_TRUE(read_range(*process(dead), kChunk, kChunk).is_ok());
  EXPECT_EQ(dead->opens(), 0);
}

TEST_F(DiskCacheStoreTest, AnObjectReplacedByOneOfAnotherSizeIsReadAtItsNewSize) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  const uint64_t new_size = 2 * kChunk + 77;
  ASSERT_TRUE(files_->put(kKey, make_pattern(kOtherSeed, 0, new_size), IoContext{}).is_ok());
  auto second = process();
  uint64_t delivered = 0;
  ASSERT_TRUE(read_range(*second, 0, kObjectSize, &delivered, kOtherSeed).is_ok());
  EXPECT_EQ(delivered, new_size);
  EXPECT_EQ(second->counters().chunk_hits, 0u);
  EXPECT_EQ(second->counters().stale_dropped, 1u);  // chunk 0: the read started there
  // The old chunks past the new end are never served either.
  EXPECT_EQ(second->open_range(kKey, 3 * kChunk + 10, 10, IoContext{}).status().code(),
            StatusCode::kOutOfRange);
}

TEST_F(DiskCacheStoreTest, AnObjectRepackedAtTheSameSizeIsFetchedAgain) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  // Packed again under the same key: a new file, renamed into place.
  ASSERT_TRUE(files_->put(kKey, make_pattern(kOtherSeed, 0, kObjectSize), IoContext{}).is_ok());
  auto second = process();
  ASSERT_TRUE(read_range(*second, 0, kObjectSize, nullptr, kOtherSeed).is_ok());
  EXPECT_EQ(second->counters().chunk_hits, 0u);
  EXPECT_GE(second->counters().stale_dropped, 1u);

  // Rewritten in place (the same inode), a moment later.
  const std::filesystem::path object = scratch_->path() / "store" / kKey;
  const auto written = std::filesystem::last_write_time(object);
  {
    std::fstream file(object, std::ios::in | std::ios::out | std::ios::binary);
    const std::vector<std::byte> data = make_pattern(kSeed, 0, kObjectSize);
    file.write(reinterpret_cast<const char*>(data.data()), static_cast<long>(data.size()));
  }
  std::filesystem::last_write_time(object, written + std::chrono::seconds(1));
  auto third = process();
  ASSERT_TRUE(read_range(*third, 0, kObjectSize, nullptr, kSeed).is_ok());
  EXPECT_EQ(third->counters().chunk_hits, 0u);
}

TEST_F(DiskCacheStoreTest, StreamsCoveringPartsOfAChunkCompleteItTogether) {
  ASSERT_TRUE(read_range(*cache_, 0, 30000).is_ok());
  EXPECT_FALSE(cached_file_exists(0));
  ASSERT_TRUE(read_range(*cache_, 30000, kChunk - 30000 + 100).is_ok());
  EXPECT_TRUE(cached_file_exists(0));
  EXPECT_FALSE(cached_file_exists(1));  // only its first 100 bytes came
  auto dead = streams_dead_upstream();
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
  EXPECT_EQ(temporary_files(), 1);  // its other part may yet come
  cache_.reset();                   // the process ends
  EXPECT_EQ(temporary_files(), 0);
}

TEST_F(DiskCacheStoreTest, IdlePartialChunksAreGivenUpBeyondAFew) {
  const std::string key = "build/rootfs.ext4";
  constexpr uint64_t kChunks = 40;
  ASSERT_TRUE(files_->put(key, make_pattern(kSeed, 0, kChunks * kChunk), IoContext{}).is_ok());
  // The first 100 bytes of every chunk, each by a stream that then ends.
  for (uint64_t index = 0; index < kChunks; ++index) {
    ASSERT_TRUE(read_range(*cache_, index * kChunk, 100, nullptr, kSeed, key).is_ok());
  }
  const int left = temporary_files();
  EXPECT_GT(left, 0);
  EXPECT_LT(left, static_cast<int>(kChunks) / 2);
  cache_.reset();
  EXPECT_EQ(temporary_files(), 0);
}

TEST_F(DiskCacheStoreTest, TemporaryFilesOfDeadProcessesAreRemovedAtOpen) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  const std::string final_name = cache_->chunk_path(kKey, 0).string();
  // One left by a process that died (nothing holds its lock), one of a
  // process alive (its lock is held: here by a descriptor of this test).
  const std::filesystem::path dead = final_name + ".tmp.999999.3";
  const std::filesystem::path alive = final_name + ".tmp.999998.0";
  std::ofstream(dead) << "left behind";
  std::ofstream(alive) << "being filled";
  UniqueFd alive_owner(::open(alive.c_str(), O_RDONLY | O_CLOEXEC));
  const int alive_fd = alive_owner.get();
  ASSERT_GE(alive_fd, 0);
  ASSERT_EQ(::flock(alive_fd, LOCK_EX | LOCK_NB), 0);

  // And a name no process of ours would make: left alone, no crash.
  const std::filesystem::path odd = final_name + ".tmp.99999999999999999999.1";
  std::ofstream(odd) << "?";

  auto second = process();
  EXPECT_FALSE(std::filesystem::exists(dead));
  EXPECT_TRUE(std::filesystem::exists(alive));
  EXPECT_TRUE(std::filesystem::exists(odd));
  EXPECT_EQ(second->counters().temps_removed, 1u);
  alive_owner.reset();  // its owner dies
  auto third = process();
  EXPECT_FALSE(std::filesystem::exists(alive));
  EXPECT_TRUE(cached_file_exists(0)) << "chunk files are not temporary files";
}

TEST_F(DiskCacheStoreTest, FilesOfTheOlderFormatAreRemovedAtOpen) {
  const std::filesystem::path group = cache_dir() / "ab";
  std::filesystem::create_directories(group);
  const std::filesystem::path old_chunk = group / "ab0123456789abcdef0123456789abcd.65536.0";
  const std::filesystem::path unrelated = group / "notes.txt";
  std::ofstream(old_chunk) << std::string(200, 'x');
  std::ofstream(unrelated) << "not the cache's";
  auto second = process();
  EXPECT_FALSE(std::filesystem::exists(old_chunk));
  EXPECT_TRUE(std::filesystem::exists(unrelated));
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
  std::ofstream(garbage, std::ios::trunc)
      << "not a chunk at all, but long enough to hold a trailer: " << std::string(64, '.');

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
  auto dead = streams_dead_upstream();
  ASSERT_TRUE(read_range(*process(dead), 0, kObjectSize).is_ok());
  EXPECT_EQ(dead->opens(), 0);
}

TEST_F(DiskCacheStoreTest, EvictsTheLeastRecentlyUsedBeyondItsBudget) {
  // Room for about two and a half full chunks.
  cache_ = process(nullptr, 5 * kChunk / 2);
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  EXPECT_GT(cache_->counters().evicted, 0u);
  EXPECT_LE(bytes_in_cache(), 5 * kChunk / 2);
  EXPECT_FALSE(cached_file_exists(0));  // the oldest went first
  EXPECT_TRUE(cached_file_exists(3));   // the newest stays
}

TEST_F(DiskCacheStoreTest, ALowerBudgetTrimsTheDirectoryAtOpen) {
  ASSERT_TRUE(read_range(*cache_, 0, kObjectSize).is_ok());
  ASSERT_GT(bytes_in_cache(), 3 * kChunk);
  auto smaller = process(nullptr, 2 * kChunk);
  EXPECT_LE(bytes_in_cache(), 2 * kChunk) << "trimmed before any read";
  EXPECT_GT(smaller->counters().evicted, 0u);
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
  auto dead = streams_dead_upstream();
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
