// The persistent chunk cache (--cache-dir) as a user meets it: processes one
// after another on one directory, over stores that change under it, killed
// mid-fill, shrunk. Each run's bytes are compared with the object's; what
// each run asked of the store comes from the cache's own counters (logged at
// info when it closes) or, over HTTP, from nginx's access log.
#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "common/units.h"
#include "storage/file_store.h"
#include "testing/nginx_server.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

const std::string kKey = "b/memfile";
constexpr uint64_t kSize = 9 * kMiB + 4097;  // three 4 MiB chunks, the last short

// The counters a cache logs when it closes.
struct CacheCounters {
  uint64_t hits = 0;
  uint64_t ranges = 0;  // asked of the store
  uint64_t stats = 0;   // asked of the store
  uint64_t published = 0;
  uint64_t stale = 0;
  uint64_t corrupt = 0;
  uint64_t temps_removed = 0;
  uint64_t evicted = 0;
};

std::optional<CacheCounters> cache_counters(const std::string& log) {
  static const std::regex line(
      R"(cache-dir .*: (\d+) chunks served from it, (\d+) ranges and (\d+) stats asked of the )"
      R"(store, (\d+) chunks published, (\d+) dropped for another object or version, (\d+) )"
      R"(dropped as corrupt, (\d+) temporary files of dead processes removed, (\d+) evicted)");
  std::smatch match;
  if (!std::regex_search(log, match, line)) return std::nullopt;
  CacheCounters c;
  uint64_t* fields[] = {&c.hits,  &c.ranges,  &c.stats,         &c.published,
                        &c.stale, &c.corrupt, &c.temps_removed, &c.evicted};
  for (size_t i = 0; i < std::size(fields); ++i) *fields[i] = std::stoull(match[i + 1].str());
  return c;
}

std::string as_string(const std::vector<std::byte>& data) {
  return std::string(reinterpret_cast<const char*>(data.data()), data.size());
}

// Files in `dir` (recursively) whose name contains `part`.
std::vector<std::filesystem::path> files_named(const std::filesystem::path& dir,
                                               const std::string& part) {
  std::vector<std::filesystem::path> found;
  std::error_code error;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, error);
       it != std::filesystem::recursive_directory_iterator(); it.increment(error)) {
    if (it->path().filename().string().find(part) != std::string::npos) found.push_back(it->path());
  }
  return found;
}

uint64_t bytes_under(const std::filesystem::path& dir) {
  uint64_t total = 0;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) total += entry.file_size();
  }
  return total;
}

class CacheCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    cache_dir_ = dir_ / "chunks";
  }

  // Puts pattern `seed` of `size` bytes at `key` in the file store `store`
  // (a directory under the scratch directory); returns the bytes.
  std::string put(const std::string& store, uint64_t seed, uint64_t size,
                  const std::string& key = kKey) {
    std::filesystem::create_directories(dir_ / store);
    Result<std::shared_ptr<FileStore>> files = FileStore::open(dir_ / store);
    EXPECT_TRUE(files) << files.status().to_string();
    const std::vector<std::byte> data = testing::make_pattern(seed, 0, size);
    EXPECT_TRUE((*files)->put(key, data, IoContext{}).is_ok());
    return as_string(data);
  }

  std::string url(const std::string& store) const { return "file://" + (dir_ / store).string(); }

  // `lazyblock cat` of `key` in `store` through the cache directory, to a
  // file whose bytes land in `out`.
  Outcome cat(const std::string& store, std::string* out, std::vector<std::string> extra = {},
              const std::string& key = kKey) {
    const std::filesystem::path output = dir_ / "out";
    std::filesystem::remove(output);
    std::vector<std::string> args = {"cat",  "--store",     url(store),          "--key",
                                     key,    "--cache-dir", cache_dir_.string(), "--log-level",
                                     "info", "-o",          output.string()};
    args.insert(args.end(), extra.begin(), extra.end());
    Outcome run = run_lazyblock(dir_, args);
    *out = slurp(output);
    return run;
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::filesystem::path cache_dir_;
};

TEST_F(CacheCliTest, TwoStoresSharingACacheDirEachGetTheirOwnBytes) {
  // Other bytes under the same key, at the same size.
  const std::string a = put("store-a", 1, kSize);
  const std::string b = put("store-b", 2, kSize);
  std::string out;
  struct Run {
    const char* store;
    const std::string* expected;
    bool cold;
  };
  for (const Run& run : {Run{"store-a", &a, true}, Run{"store-b", &b, true},
                         Run{"store-a", &a, false}, Run{"store-b", &b, false}}) {
    Outcome outcome = cat(run.store, &out);
    ASSERT_EQ(outcome.status, 0) << outcome.err;
    EXPECT_TRUE(out == *run.expected) << run.store << ": wrong bytes";
    std::optional<CacheCounters> counters = cache_counters(outcome.err);
    ASSERT_TRUE(counters) << outcome.err;
    if (run.cold) {
      EXPECT_EQ(counters->hits, 0u) << run.store << " was served the other store's chunks";
      EXPECT_GE(counters->ranges, 1u);
      EXPECT_EQ(counters->published, 3u);
    } else {
      // Both stores' chunks are kept side by side.
      EXPECT_EQ(counters->hits, 3u) << run.store;
      EXPECT_EQ(counters->ranges, 0u) << run.store;
    }
  }
}

TEST_F(CacheCliTest, AChunkFileCopiedUnderAnotherIndexIsAMiss) {
  const std::string expected = put("store", 1, kSize);
  std::string out;
  ASSERT_EQ(cat("store", &out).status, 0);
  const std::vector<std::filesystem::path> first = files_named(cache_dir_, ".0.c2");
  const std::vector<std::filesystem::path> second = files_named(cache_dir_, ".1.c2");
  ASSERT_EQ(first.size(), 1u);
  ASSERT_EQ(second.size(), 1u);
  std::filesystem::copy_file(first[0], second[0],
                             std::filesystem::copy_options::overwrite_existing);
  Outcome run = cat("store", &out);
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(out == expected) << "wrong bytes";
  std::optional<CacheCounters> counters = cache_counters(run.err);
  ASSERT_TRUE(counters) << run.err;
  EXPECT_EQ(counters->stale, 1u);
  EXPECT_EQ(counters->hits, 2u);
  EXPECT_EQ(counters->ranges, 1u) << "chunk 1 fetched again";
}

TEST_F(CacheCliTest, AnObjectReplacedByOneOfAnotherSizeIsServedAtItsNewSize) {
  put("store", 1, kSize);
  std::string out;
  ASSERT_EQ(cat("store", &out).status, 0);
  for (uint64_t size : {kSize - 5 * kMiB, kSize + 3 * kMiB}) {
    const std::string expected = put("store", size, size);
    Outcome run = cat("store", &out);
    ASSERT_EQ(run.status, 0) << run.err;
    EXPECT_EQ(out.size(), size);
    EXPECT_TRUE(out == expected) << "wrong bytes at size " << size;
  }
}

TEST_F(CacheCliTest, AnObjectRewrittenInPlaceIsServedAnew) {
  put("store", 1, kSize);
  std::string out;
  ASSERT_EQ(cat("store", &out).status, 0);
  // The same file, overwritten with other bytes of the same length.
  const std::vector<std::byte> data = testing::make_pattern(2, 0, kSize);
  std::ofstream(dir_ / "store" / kKey, std::ios::binary | std::ios::in | std::ios::out)
      .write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(kSize));
  Outcome run = cat("store", &out);
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(out == as_string(data)) << "the old bytes were served";
  std::optional<CacheCounters> counters = cache_counters(run.err);
  ASSERT_TRUE(counters) << run.err;
  EXPECT_EQ(counters->hits, 0u);
}

TEST_F(CacheCliTest, ABuildRepackedUnderTheSameIdIsServedAnew) {
  const std::string build = "00000001-1111-4222-8333-444455556666";
  std::filesystem::create_directories(dir_ / "store");
  for (uint64_t seed : {1, 2}) {
    const std::filesystem::path raw = dir_ / "rootfs.raw";
    const std::string bytes = as_string(testing::make_pattern(seed, 0, 9 * kMiB));
    std::ofstream(raw, std::ios::binary | std::ios::trunc) << bytes;
    // Re-packed under the same id, as `pack --force` does.
    Outcome packed =
        run_lazyblock(dir_, {"pack", "--store", url("store"), "--build", build, "--name",
                             "rootfs.ext4", "--block-size", "4096", "--force", raw.string()});
    ASSERT_EQ(packed.status, 0) << packed.err;
    const std::filesystem::path output = dir_ / "exported";
    Outcome exported = run_lazyblock(
        dir_, {"export", "--store", url("store"), "--build", build, "--name", "rootfs.ext4",
               "--cache-dir", cache_dir_.string(), "-o", output.string()});
    ASSERT_EQ(exported.status, 0) << exported.err;
    EXPECT_TRUE(slurp(output) == bytes) << "pack " << seed << ": wrong bytes";
  }
}

TEST_F(CacheCliTest, AKilledProcessLeavesNoTemporaryFileAfterTheNextRun) {
  const std::string expected = put("store", 1, kSize);
  // A fill that stops after 1 MiB of each stream and waits there.
  Result<testing::ChildProcess> fill = start_lazyblock(
      {"cat", "--store", url("store"), "--key", kKey, "--cache-dir", cache_dir_.string(),
       "--faults", "stall-after=1MiB", "--timeout", "60s", "-o", "/dev/null"});
  ASSERT_TRUE(fill) << fill.status().to_string();
  const std::string mark = ".tmp." + std::to_string(fill->pid()) + ".";
  while (files_named(cache_dir_, mark).empty()) {
    ASSERT_TRUE(fill->running()) << "the fill ended before it began";
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_EQ(fill->kill_hard(), 128 + SIGKILL);
  ASSERT_FALSE(files_named(cache_dir_, mark).empty());

  std::string out;
  Outcome run = cat("store", &out);
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(out == expected);
  EXPECT_TRUE(files_named(cache_dir_, mark).empty()) << "the killed process's files remain";
  EXPECT_TRUE(files_named(cache_dir_, ".tmp.").empty()) << "the run left its own";
  std::optional<CacheCounters> counters = cache_counters(run.err);
  ASSERT_TRUE(counters) << run.err;
  EXPECT_GE(counters->temps_removed, 1u);
}

TEST_F(CacheCliTest, ALowerCacheSizeTrimsTheDirectoryAtStart) {
  const std::string expected = put("store", 1, kSize);
  std::string out;
  ASSERT_EQ(cat("store", &out).status, 0);
  ASSERT_GT(bytes_under(cache_dir_), 9 * kMiB);
  // Every chunk is in the directory: only a trim at start removes any.
  Outcome run = cat("store", &out, {"--cache-size", "5MiB"});
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(out == expected);
  EXPECT_LE(bytes_under(cache_dir_), 5 * kMiB);
  std::optional<CacheCounters> counters = cache_counters(run.err);
  ASSERT_TRUE(counters) << run.err;
  EXPECT_GE(counters->evicted, 2u);
}

// Over HTTP: the requests each process sends, from nginx's access log.
class CacheHttpCliTest : public CacheCliTest {
 protected:
  void SetUp() override {
    CacheCliTest::SetUp();
    Result<std::unique_ptr<testing::NginxServer>> server = testing::NginxServer::start();
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
  }

  std::string serve(const std::string& prefix, uint64_t seed, uint64_t size) {
    const std::vector<std::byte> data = testing::make_pattern(seed, 0, size);
    const std::filesystem::path file = server_->docroot() / prefix / kKey;
    std::filesystem::create_directories(file.parent_path());
    std::ofstream(file, std::ios::binary)
        .write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(size));
    return as_string(data);
  }

  // Requests with `method` for `prefix`'s object in the access log since
  // it had `from` bytes.
  int requests(const std::string& method, const std::string& prefix, size_t from) const {
    const std::string log = server_->access_log().substr(from);
    const std::string needle = " " + method + " /" + prefix + "/" + kKey + " ";
    int count = 0;
    for (size_t at = log.find(needle); at != std::string::npos; at = log.find(needle, at + 1)) {
      ++count;
    }
    return count;
  }

  Outcome cat_http(const std::string& prefix, std::string* out) {
    const std::filesystem::path output = dir_ / "out";
    std::filesystem::remove(output);
    Outcome run =
        run_lazyblock(dir_, {"cat", "--store", server_->url() + "/" + prefix, "--key", kKey,
                             "--cache-dir", cache_dir_.string(), "-o", output.string()});
    *out = slurp(output);
    return run;
  }

  std::unique_ptr<testing::NginxServer> server_;
};

TEST_F(CacheHttpCliTest, TwoServersSharingACacheDirEachGetTheirOwnBytes) {
  const std::string a = serve("a", 1, kSize);
  const std::string b = serve("b", 2, kSize);
  std::string out;
  for (bool cold : {true, false}) {
    for (const auto& [prefix, expected] : {std::pair{"a", &a}, std::pair{"b", &b}}) {
      const size_t from = server_->access_log().size();
      Outcome run = cat_http(prefix, &out);
      ASSERT_EQ(run.status, 0) << run.err;
      EXPECT_TRUE(out == *expected) << prefix << ": wrong bytes";
      if (cold) {
        EXPECT_GE(requests("GET", prefix, from), 1) << prefix << ": no miss";
      } else {
        // Served from the directory: the server is asked only which
        // version it has.
        EXPECT_EQ(requests("GET", prefix, from), 0) << prefix;
        EXPECT_EQ(requests("HEAD", prefix, from), 1) << prefix;
      }
    }
  }
}

TEST_F(CacheHttpCliTest, AFileChangedOnTheServerIsFetchedAgain) {
  serve("a", 1, kSize);
  std::string out;
  ASSERT_EQ(cat_http("a", &out).status, 0);
  // Other bytes of the same length, with another modification time (so
  // another ETag) as a later upload has.
  const std::string changed = serve("a", 2, kSize);
  const std::filesystem::path file = server_->docroot() / "a" / kKey;
  std::filesystem::last_write_time(file,
                                   std::filesystem::last_write_time(file) + std::chrono::hours(1));
  const size_t from = server_->access_log().size();
  Outcome run = cat_http("a", &out);
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(out == changed) << "the old bytes were served";
  EXPECT_GE(requests("GET", "a", from), 1);
}

}  // namespace
}  // namespace lazyblock
