// The lazyblock command run as a user runs it: exit statuses, messages,
// byte-exact output.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/units.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

class CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    std::filesystem::create_directories(dir_ / "store");
    store_url_ = "file://" + (dir_ / "store").string();
  }

  std::string put_object(const std::string& key, uint64_t size) {
    Result<std::shared_ptr<FileStore>> store = FileStore::open(dir_ / "store");
    EXPECT_TRUE(store);
    std::vector<std::byte> data = testing::make_pattern(9, 0, size);
    EXPECT_TRUE((*store)->put(key, data, IoContext{}).is_ok());
    return std::string(reinterpret_cast<const char*>(data.data()), data.size());
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::string store_url_;
};

TEST_F(CliTest, CatWritesTheObjectToAFile) {
  const std::string expected = put_object("b1/memfile", 9 * kMiB + 4321);
  for (const char* fetch : {"full", "streaming", "split"}) {
    const std::filesystem::path output = dir_ / (std::string("out-") + fetch);
    Outcome run = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "b1/memfile",
                                       "--fetch", fetch, "-o", output.string()});
    ASSERT_EQ(run.status, 0) << run.err;
    EXPECT_TRUE(slurp(output) == expected) << "output differs from the object (" << fetch << ")";
  }
}

TEST_F(CliTest, CatWritesTheObjectToStdout) {
  const std::string expected = put_object("b1/rootfs.ext4", 5 * kMiB + 1);
  Outcome run = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "b1/rootfs.ext4"});
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(run.out == expected) << "stdout differs from the object";
}

TEST_F(CliTest, CatThroughASimulatedStore) {
  const std::string expected = put_object("obj", 2 * kMiB);
  Outcome run = run_lazyblock(
      dir_, {"cat", "--store", store_url_, "--key", "obj", "--simulate", "ttfb=1ms,bw=1GB/s"});
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(run.out == expected);
}

TEST_F(CliTest, CatWithFewStreamsAndNoReadahead) {
  const std::string expected = put_object("obj", 9 * kMiB + 7);
  Outcome run = run_lazyblock(
      dir_, {"cat", "--store", store_url_, "--key", "obj", "--parallel", "1", "--no-readahead"});
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(run.out == expected);
}

TEST_F(CliTest, TransientFailuresAreRetriedAndStreamsResumed) {
  const std::string expected = put_object("obj", 6 * kMiB + 3);
  // Every stream breaks after 1 MiB: each retry resumes where the last
  // broke, and makes progress.
  // Through a chunker, and as one stream with no cache (--parallel 1).
  for (const char* parallel : {"8", "1"}) {
    Outcome run = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "obj", "--faults",
                                       "fail-after=1MiB", "--parallel", parallel});
    ASSERT_EQ(run.status, 0) << parallel << ": " << run.err;
    EXPECT_TRUE(run.out == expected) << parallel;
  }
  Outcome no_retry = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "obj", "--faults",
                                          "fail-after=1MiB", "--retry", "0"});
  EXPECT_EQ(no_retry.status, 1);
  EXPECT_NE(no_retry.err.find("injected fault"), std::string::npos) << no_retry.err;
}

TEST_F(CliTest, ASecondProcessReadsFromTheCacheDirAskingTheStoreOnlyItsVersion) {
  const std::string expected = put_object("b/memfile", 9 * kMiB + 4097);
  const std::string cache_dir = (dir_ / "chunks").string();
  Outcome first = run_lazyblock(
      dir_, {"cat", "--store", store_url_, "--key", "b/memfile", "--cache-dir", cache_dir});
  ASSERT_EQ(first.status, 0) << first.err;
  EXPECT_TRUE(first.out == expected);
  // Every stream from the store now fails at its first byte (its size and
  // version are still answered): the cache must serve every byte.
  Outcome second =
      run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "b/memfile", "--cache-dir",
                           cache_dir, "--faults", "fail-after=0", "--retry", "0"});
  ASSERT_EQ(second.status, 0) << second.err;
  EXPECT_TRUE(second.out == expected);
  // Without the cache, the same command fails: the faults are real.
  Outcome uncached = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "b/memfile",
                                          "--faults", "fail-after=0", "--retry", "0"});
  EXPECT_EQ(uncached.status, 1);
  // A store that cannot say which version it has is not trusted with old
  // chunks: the read fails as it would without the cache.
  Outcome down =
      run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "b/memfile", "--cache-dir",
                           cache_dir, "--faults", "fail-open", "--retry", "0"});
  EXPECT_EQ(down.status, 1);
  EXPECT_NE(down.err.find("injected fault"), std::string::npos) << down.err;
}

TEST_F(CliTest, MissingKeyIsAnErrorNamingTheKey) {
  Outcome run = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "no/such/object"});
  EXPECT_EQ(run.status, 1);
  EXPECT_NE(run.err.find("object not found: no/such/object"), std::string::npos) << run.err;
  EXPECT_TRUE(run.out.empty());
}

TEST_F(CliTest, FailedFetchLeavesNoOutputFile) {
  put_object("obj", 6 * kMiB);
  const std::filesystem::path output = dir_ / "out";
  // Every stream breaks after 1 MiB; without retries, the copy fails.
  Outcome run = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "obj", "--faults",
                                     "fail-after=1MiB", "--retry", "0", "-o", output.string()});
  EXPECT_EQ(run.status, 1);
  EXPECT_NE(run.err.find("obj"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("injected fault"), std::string::npos) << run.err;
  EXPECT_FALSE(std::filesystem::exists(output));
  for (const auto& entry : std::filesystem::directory_iterator(dir_)) {
    EXPECT_EQ(entry.path().filename().string().find(".out.partial"), std::string::npos)
        << "temporary file left behind: " << entry.path();
  }
}

// On a filesystem without unnamed files (O_TMPFILE), as FUSE and some NFS
// are, -o writes a named temporary file beside the target instead: a copy
// that succeeds replaces the old file, one that fails leaves it untouched,
// and neither leaves the temporary file.
TEST_F(CliTest, OutputToAFilesystemWithoutUnnamedFilesReplacesOrKeepsTheFileAndLeavesNoOther) {
  const std::string expected = put_object("obj", 6 * kMiB);
  const std::filesystem::path backing = dir_ / "backing";
  const std::filesystem::path mounted = dir_ / "fuse";
  std::filesystem::create_directories(backing);
  std::filesystem::create_directories(mounted);
  const std::string mount =
      fmt::format("bindfs '{}' '{}' 2>&1", backing.string(), mounted.string());
  ASSERT_EQ(std::system(mount.c_str()), 0) << "bindfs (scripts/install-deps) could not mount";
  struct Unmount {
    std::filesystem::path path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mounted};
  const std::filesystem::path output = mounted / "out";
  {
    // It is such a filesystem.
    const int fd = ::open(mounted.c_str(), O_TMPFILE | O_WRONLY, 0600);
    EXPECT_LT(fd, 0) << "this FUSE filesystem has unnamed files: the test proves nothing";
    if (fd >= 0) ::close(fd);
  }
  const auto others = [&] {
    std::vector<std::string> names;
    for (const auto& entry : std::filesystem::directory_iterator(mounted)) {
      if (entry.path() != output) names.push_back(entry.path().filename().string());
    }
    return names;
  };
  Outcome copied =
      run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "obj", "-o", output.string()});
  ASSERT_EQ(copied.status, 0) << copied.err;
  EXPECT_TRUE(slurp(output) == expected);
  EXPECT_TRUE(others().empty()) << "left behind: " << others()[0];
  // Every stream breaks after 1 MiB; without retries, the copy fails.
  Outcome failed = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "obj", "--faults",
                                        "fail-after=1MiB", "--retry", "0", "-o", output.string()});
  EXPECT_EQ(failed.status, 1) << failed.err;
  EXPECT_TRUE(slurp(output) == expected) << "the old file was touched";
  EXPECT_TRUE(others().empty()) << "left behind: " << others()[0];
}

// kill -9 of `cat -o FILE` mid-copy on such a filesystem: FILE keeps its
// old bytes, the named temporary file is what is left beside it (as the
// README says), and the next run writes FILE whole.
TEST_F(CliTest, ACatKilledMidCopyOnAFilesystemWithoutUnnamedFilesKeepsTheOldFile) {
  const std::string expected = put_object("obj", 6 * kMiB);
  const std::filesystem::path backing = dir_ / "backing";
  const std::filesystem::path mounted = dir_ / "fuse";
  std::filesystem::create_directories(backing);
  std::filesystem::create_directories(mounted);
  const std::string mount =
      fmt::format("bindfs '{}' '{}' 2>&1", backing.string(), mounted.string());
  ASSERT_EQ(std::system(mount.c_str()), 0) << "bindfs (scripts/install-deps) could not mount";
  struct Unmount {
    std::filesystem::path path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{mounted};
  const std::filesystem::path output = mounted / "out";
  const std::string old_bytes = "the user's own file\n";
  {
    std::ofstream old(output, std::ios::binary);
    old << old_bytes;
  }
  const auto partials = [&] {
    std::vector<std::filesystem::path> found;
    for (const auto& entry : std::filesystem::directory_iterator(mounted)) {
      if (entry.path().filename().string().rfind(".out.partial-", 0) == 0) {
        found.push_back(entry.path());
      }
    }
    return found;
  };
  // Slow (~0.6 s): killed once the temporary file has bytes.
  Result<testing::ChildProcess> cat =
      start_lazyblock({"cat", "--store", store_url_, "--key", "obj", "--simulate",
                       "ttfb=5ms,bw=10MB/s", "--parallel", "1", "-o", output.string()});
  ASSERT_TRUE(cat) << cat.status().to_string();
  bool filling = false;
  const auto started = std::chrono::steady_clock::now();
  while (!filling && std::chrono::steady_clock::now() - started < std::chrono::seconds(20)) {
    for (const std::filesystem::path& partial : partials()) {
      std::error_code error;
      if (std::filesystem::file_size(partial, error) > 0 && !error) filling = true;
    }
    if (!filling) std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling a file
  }
  EXPECT_EQ(cat->kill_hard(), 128 + SIGKILL);
  ASSERT_TRUE(filling) << "no temporary file with bytes in it was seen";
  EXPECT_EQ(slurp(output), old_bytes) << "the old file was touched";
  EXPECT_EQ(partials().size(), 1u);
  for (const std::filesystem::path& partial : partials()) std::filesystem::remove(partial);
  Outcome again =
      run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "obj", "-o", output.string()});
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_TRUE(slurp(output) == expected);
}

TEST_F(CliTest, StalledFetchEndsAtTheTimeout) {
  put_object("obj", 2 * kMiB);
  Outcome run = run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "obj", "--faults",
                                     "stall-after=1MiB", "--timeout", "200ms"});
  EXPECT_EQ(run.status, 1);
  EXPECT_NE(run.err.find("deadline"), std::string::npos) << run.err;
  EXPECT_TRUE(run.out.empty()) << "no byte of a chunk that did not arrive whole is written";
}

TEST_F(CliTest, UsageErrorsExitWithTwo) {
  EXPECT_EQ(run_lazyblock(dir_, {"cat", "--key", "x"}).status, 2);  // no --store
  EXPECT_EQ(run_lazyblock(dir_, {"frobnicate"}).status, 2);
  Outcome bad_strategy =
      run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "x", "--fetch", "psychic"});
  EXPECT_EQ(bad_strategy.status, 2);
  EXPECT_NE(bad_strategy.err.find("psychic"), std::string::npos) << bad_strategy.err;
  EXPECT_EQ(
      run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "x", "--timeout", "soon"}).status,
      2);
  EXPECT_EQ(run_lazyblock(dir_, {"bench", "fetch", "--profile", "moon"}).status, 2);
  EXPECT_EQ(
      run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "x", "--parallel", "0"}).status,
      2);
}

TEST_F(CliTest, MistakesOnTheCommandLineAreSaidInWords) {
  Outcome typo = run_lazyblock(dir_, {"packk", "--store", store_url_});
  EXPECT_EQ(typo.status, 2);
  EXPECT_NE(typo.err.find("lazyblock: usage: unknown command 'packk' (did you mean 'pack'?)"),
            std::string::npos)
      << typo.err;
  Outcome sub_typo = run_lazyblock(dir_, {"serve", "nbdd"});
  EXPECT_EQ(sub_typo.status, 2);
  EXPECT_NE(sub_typo.err.find("did you mean 'serve nbd'?"), std::string::npos) << sub_typo.err;
  Outcome range =
      run_lazyblock(dir_, {"cat", "--store", store_url_, "--key", "x", "--parallel", "0"});
  EXPECT_EQ(range.status, 2);
  EXPECT_NE(range.err.find("--parallel: must be a whole number of at least 1"), std::string::npos)
      << range.err;
  EXPECT_LT(range.err.size(), 200u) << range.err;
  Outcome missing = run_lazyblock(dir_, {"cat", "--key", "x"});
  EXPECT_EQ(missing.status, 2);
  EXPECT_EQ(missing.err.rfind("lazyblock: usage: --store is required", 0), 0u) << missing.err;
  Outcome version = run_lazyblock(dir_, {"--version"});
  EXPECT_EQ(version.status, 0);
  EXPECT_EQ(version.out.rfind("lazyblock ", 0), 0u) << version.out;
}

TEST_F(CliTest, HelpExplainsTheCommands) {
  Outcome run = run_lazyblock(dir_, {"--help"});
  EXPECT_EQ(run.status, 0);
  EXPECT_NE(run.out.find("cat"), std::string::npos);
  EXPECT_NE(run.out.find("bench"), std::string::npos);
  Outcome cat_help = run_lazyblock(dir_, {"cat", "--help"});
  EXPECT_EQ(cat_help.status, 0);
  EXPECT_NE(cat_help.out.find("--key"), std::string::npos) << cat_help.out;
}

TEST_F(CliTest, BenchFetchJsonHasTheDocumentedShape) {
  Outcome run =
      run_lazyblock(dir_, {"bench", "fetch", "--profile", "ttfb=1ms,bw=2GB/s", "--strategy",
                           "full,streaming,split", "--iterations", "3", "--json"});
  ASSERT_EQ(run.status, 0) << run.err;
  const nlohmann::json doc = nlohmann::json::parse(run.out);
  EXPECT_EQ(doc.at("profile"), "ttfb=1ms,bw=2GB/s");
  const double limit = doc.at("limit_us");
  EXPECT_DOUBLE_EQ(limit, 1000 + 4096 / 2e9 * 1e6);
  ASSERT_EQ(doc.at("results").size(), 3u);
  EXPECT_EQ(doc["results"][0].at("strategy"), "full");
  EXPECT_EQ(doc["results"][1].at("strategy"), "streaming");
  EXPECT_EQ(doc["results"][2].at("strategy"), "split");
  for (const nlohmann::json& result : doc["results"]) {
    // Each iteration fetched its one chunk whole, no byte twice; full and
    // streaming in one request, split in at most one more per caller.
    EXPECT_EQ(result.at("bytes_per_iter"), 4.0 * kMiB);
    const double requests = result.at("requests_per_iter");
    if (result.at("strategy") == "split") {
      EXPECT_GE(requests, 1.0);
      EXPECT_LE(requests, 4.0);
    } else {
      EXPECT_EQ(requests, 1.0);
    }
    EXPECT_GE(result.at("model_us").get<double>(), limit);
    for (const char* field : {"avg_us", "p50_us", "p99_us", "worst_us"}) {
      EXPECT_GT(result.at(field).get<double>(), 0) << field;
    }
    EXPECT_LE(result.at("p50_us").get<double>(), result.at("worst_us").get<double>());
  }
  // The full strategy's model is TTFB + chunk / BW; split's is the limit.
  EXPECT_DOUBLE_EQ(doc["results"][0].at("model_us").get<double>(), 1000 + 4.0 * kMiB / 2e9 * 1e6);
  EXPECT_DOUBLE_EQ(doc["results"][2].at("model_us").get<double>(), limit);
}

TEST_F(CliTest, BenchHitJsonHasTheDocumentedShape) {
  Outcome run = run_lazyblock(dir_, {"bench", "hit", "--json"});
  ASSERT_EQ(run.status, 0) << run.err;
  const nlohmann::json doc = nlohmann::json::parse(run.out);
  ASSERT_EQ(doc.at("results").size(), 4u);
  for (const nlohmann::json& result : doc["results"]) {
    const std::string name = result.at("name");
    EXPECT_TRUE(name == "slice" || name == "read_at") << name;
    const int threads = result.at("threads");
    EXPECT_TRUE(threads == 1 || threads == 2);
    EXPECT_GT(result.at("median_ns").get<double>(), 0);
    EXPECT_GE(result.at("p99_ns").get<double>(), result.at("median_ns").get<double>());
  }
}

TEST_F(CliTest, BenchSeqJsonHasTheDocumentedShape) {
  Outcome run = run_lazyblock(dir_, {"bench", "seq", "--profile", "ttfb=1ms,bw=1GB/s", "--size",
                                     "37MiB", "--parallel", "3", "--json"});
  ASSERT_EQ(run.status, 0) << run.err;
  const nlohmann::json doc = nlohmann::json::parse(run.out);
  EXPECT_EQ(doc.at("profile"), "ttfb=1ms,bw=1GB/s");
  EXPECT_EQ(doc.at("size"), 37 * kMiB);
  EXPECT_DOUBLE_EQ(doc.at("limit_mb_per_s").get<double>(), 3 * 1000.0);
  EXPECT_GT(doc.at("mb_per_s").get<double>(), 0);
  // Every chunk fetched (split may cut a chunk into more streams).
  EXPECT_GE(doc.at("requests").get<uint64_t>(), 10u);
}

// Compressed: the limit is the lowest of the three it measures or derives,
// and the pass names the one that binds.
TEST_F(CliTest, BenchSeqCompressedJsonTakesTheLowestOfItsLimits) {
  Outcome run = run_lazyblock(dir_, {"bench", "seq", "--profile", "ttfb=1ms,bw=100MB/s", "--size",
                                     "24MiB", "--parallel", "2", "--compressed", "lz4", "--json"});
  ASSERT_EQ(run.status, 0) << run.err;
  const nlohmann::json doc = nlohmann::json::parse(run.out);
  EXPECT_EQ(doc.at("compressed"), "lz4");
  const double streams = doc.at("stream_limit_mb_per_s").get<double>();
  const double cores = doc.at("cores_limit_mb_per_s").get<double>();
  const double memory = doc.at("new_memory_mb_per_s").get<double>();
  EXPECT_DOUBLE_EQ(streams, 2 * 100.0 * doc.at("ratio").get<double>());
  EXPECT_GT(cores, 0);
  EXPECT_GT(memory, 0);
  EXPECT_DOUBLE_EQ(doc.at("limit_mb_per_s").get<double>(), std::min({streams, cores, memory}));
  const std::string binds = doc.at("binds");
  const double bound = binds == "streams" ? streams : binds == "cores" ? cores : memory;
  EXPECT_TRUE(binds == "streams" || binds == "cores" || binds == "new memory") << binds;
  EXPECT_DOUBLE_EQ(bound, doc.at("limit_mb_per_s").get<double>());
}

TEST_F(CliTest, BenchFetchAgainstARealStore) {
  put_object("obj", 5 * kMiB);
  Outcome run =
      run_lazyblock(dir_, {"bench", "fetch", "--store", store_url_, "--key", "obj", "--strategy",
                           "streaming,split", "--iterations", "3", "--json"});
  ASSERT_EQ(run.status, 0) << run.err;
  const nlohmann::json doc = nlohmann::json::parse(run.out);
  EXPECT_EQ(doc.at("profile"), "measured");
  EXPECT_EQ(doc.at("key"), "obj");
  EXPECT_GT(doc.at("mb_per_s").get<double>(), 0);
  ASSERT_EQ(doc.at("results").size(), 2u);
  EXPECT_EQ(doc.at("results")[1].at("strategy"), "split");
  // Nothing fetched twice: each iteration reads the first 4 MiB once.
  EXPECT_DOUBLE_EQ(doc.at("results")[1].at("bytes_per_iter").get<double>(), 4.0 * kMiB);

  EXPECT_EQ(run_lazyblock(dir_, {"bench", "fetch", "--store", store_url_}).status, 2);  // no key
  EXPECT_EQ(run_lazyblock(dir_, {"bench", "fetch"}).status, 2);  // neither store nor profile
  Outcome missing = run_lazyblock(dir_, {"bench", "fetch", "--store", store_url_, "--key", "nope"});
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("object not found: nope"), std::string::npos) << missing.err;
}

// `serve nbd` with ARGS in the background, from `dir`; once it prints its
// URI, nbdinfo (from /) asks that URI the export's size. Prints the URI, then
// the size.
const char* kServeAndAsk = R"SH(
lazyblock=$1 dir=$2; shift 2
cd "$dir" && "$lazyblock" serve nbd "$@" > served 2>&1 & pid=$!
for _ in $(seq 1 1000); do grep -q 'nbd[+a-z]*://' "$dir/served" && break; sleep 0.01; done
uri=$(grep -o 'nbd[+a-z]*://[^ ]*' "$dir/served")
echo "$uri"
cd / && nbdinfo --size "$uri"; status=$?
kill $pid; wait $pid
cat "$dir/served" >&2
exit $status
)SH";

TEST_F(CliTest, ServeNbdListensOnHostNamesAndIpv6AndPrintsAnAbsoluteSocketPath) {
  const std::string build = "0c0c0c0c-1111-4222-8333-444455556666";
  put_object("raw", 4 * kMiB);
  std::filesystem::copy_file(dir_ / "store" / "raw", dir_ / "raw.img");
  Outcome packed = run_lazyblock(dir_, {"pack", "--store", store_url_, "--build", build, "--name",
                                        "rootfs.ext4", (dir_ / "raw.img").string(), "--quiet"});
  ASSERT_EQ(packed.status, 0) << packed.err;
  const std::vector<std::string> served = {"--store", store_url_,    "--build",    build,
                                           "--name",  "rootfs.ext4", "--read-only"};
  const auto serve = [&](std::vector<std::string> where) {
    std::vector<std::string> args = {"-c", kServeAndAsk, "sh", lazyblock_binary(), dir_.string()};
    args.insert(args.end(), served.begin(), served.end());
    args.insert(args.end(), where.begin(), where.end());
    return run_program(dir_, "sh", args);
  };
  const std::string size = std::to_string(4 * kMiB);

  Outcome by_name = serve({"--listen", "localhost:0"});
  EXPECT_EQ(by_name.status, 0) << by_name.err;
  EXPECT_EQ(by_name.out.rfind("nbd://localhost:", 0), 0u) << by_name.out;
  EXPECT_NE(by_name.out.find("\n" + size + "\n"), std::string::npos) << by_name.out;

  Outcome ipv6 = serve({"--listen", "[::1]:0"});
  if (ipv6.err.find("Address family not supported") != std::string::npos ||
      ipv6.err.find("Cannot assign requested address") != std::string::npos) {
    GTEST_SKIP() << "no IPv6 loopback here: " << ipv6.err;
  }
  EXPECT_EQ(ipv6.status, 0) << ipv6.err;
  EXPECT_EQ(ipv6.out.rfind("nbd://[::1]:", 0), 0u) << ipv6.out;
  EXPECT_NE(ipv6.out.find("\n" + size + "\n"), std::string::npos) << ipv6.out;

  // A relative --socket, and a client in another directory.
  Outcome relative = serve({"--socket", "nbd.sock"});
  EXPECT_EQ(relative.status, 0) << relative.err;
  EXPECT_EQ(relative.out.rfind("nbd+unix:///rootfs.ext4?socket=" + (dir_ / "nbd.sock").string(), 0),
            0u)
      << relative.out;
  EXPECT_NE(relative.out.find("\n" + size + "\n"), std::string::npos) << relative.out;

  Outcome ambiguous = run_lazyblock(dir_, {"serve", "nbd", "--store", store_url_, "--build", build,
                                           "--name", "rootfs.ext4", "--listen", "::1:10809"});
  EXPECT_EQ(ambiguous.status, 2) << ambiguous.err;
  EXPECT_NE(ambiguous.err.find("[::1]:10809"), std::string::npos) << ambiguous.err;
}

TEST_F(CliTest, TheLogLevelMayComeBeforeTheCommand) {
  const std::vector<std::string> cat = {
      "cat", "--store", store_url_, "--key", "no/such", "-o", (dir_ / "out").string()};
  std::vector<std::string> global = {"--log-level", "info"};
  global.insert(global.end(), cat.begin(), cat.end());
  // (A cat that succeeds says at info how many requests it took.)
  put_object("there", 4096);
  std::vector<std::string> found = global;
  found[6] = "there";
  Outcome before = run_lazyblock(dir_, found);
  EXPECT_EQ(before.status, 0) << before.err;
  EXPECT_NE(before.err.find("lazyblock: info: "), std::string::npos) << before.err;

  // The command's own wins.
  global.insert(global.end(), {"--log-level", "error"});
  Outcome own = run_lazyblock(dir_, global);
  EXPECT_EQ(own.status, 1) << own.err;
  EXPECT_EQ(own.err.find("info: "), std::string::npos) << own.err;
  EXPECT_NE(own.err.find("lazyblock: error: "), std::string::npos) << own.err;

  // Without either: warnings and errors only.
  Outcome neither = run_lazyblock(dir_, cat);
  EXPECT_EQ(neither.err.find("info: "), std::string::npos) << neither.err;

  Outcome typo = run_lazyblock(dir_, {"--log-level=debug", "packk"});
  EXPECT_EQ(typo.status, 2) << typo.err;
  EXPECT_NE(typo.err.find("unknown command 'packk' (did you mean 'pack'?)"), std::string::npos)
      << typo.err;
  Outcome bad =
      run_lazyblock(dir_, {"--log-level", "loud", "cat", "--store", store_url_, "--key", "k"});
  EXPECT_EQ(bad.status, 2) << bad.err;
  EXPECT_NE(bad.err.find("loud"), std::string::npos) << bad.err;
}

TEST_F(CliTest, EachCommandsHelpListsOnlyTheFlagsItUses) {
  const auto help_of = [&](std::vector<std::string> command) {
    command.push_back("--help");
    Outcome help = run_lazyblock(dir_, command);
    EXPECT_EQ(help.status, 0) << help.err;
    return help.out;
  };
  const std::string pack = help_of({"pack"});
  // An option's line in the help ("  --flag TEXT  what it does").
  const auto listed = [](const std::string& help, const std::string& flag) {
    return help.find("\n  " + flag + " ") != std::string::npos;
  };
  for (const char* flag : {"--store", "--retry", "--timeout", "--ca-file", "--faults"}) {
    EXPECT_TRUE(listed(pack, flag)) << flag << " missing from: " << pack;
  }
  // How reads are fetched and cached is no writer's business.
  for (const char* flag :
       {"--fetch", "--parallel", "--cache-dir", "--cache-size", "--no-readahead", "--simulate"}) {
    EXPECT_FALSE(listed(pack, flag)) << flag << " in: " << pack;
  }
  for (const std::vector<std::string>& reader :
       std::vector<std::vector<std::string>>{{"cat"}, {"export"}, {"serve", "nbd"}}) {
    const std::string help = help_of(reader);
    const size_t reading = help.find("\nReading:");
    const size_t testing = help.find("\nTesting:");
    ASSERT_NE(reading, std::string::npos) << help;
    ASSERT_NE(testing, std::string::npos) << help;
    EXPECT_GT(help.find("--parallel"), reading) << help;
    EXPECT_GT(help.find("--cache-dir"), reading) << help;
    // --faults only under "Testing".
    EXPECT_GT(help.find("--faults"), testing) << help;
  }
  EXPECT_GT(pack.find("--faults"), pack.find("\nTesting:")) << pack;
}

}  // namespace
}  // namespace lazyblock
