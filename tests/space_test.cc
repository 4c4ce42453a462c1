// Disk space as a user meets it: `export` and `cat` of objects many times
// the size of $TMPDIR, `serve nbd` with its block cache on a small full
// filesystem, a cache file cut short under a copy, processes killed with
// -9 mid-fill. The small filesystems are tmpfs mounts of the test's own
// (we run as root), unmounted when each test ends, whatever happens.
//
// Sizes are scaled down from the (a 2 GiB export on a 64 MiB
// $TMPDIR) so that the tests stay quick: a 256 MiB image on a 16 MiB one.
#include <fcntl.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cerrno>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "common/units.h"
#include "testing/build_fixture.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "testing/unnamed_files.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

const std::string kBuild = "5a5a5a5a-1111-4222-8333-444455556666";
const std::string kSmallBuild = "5b5b5b5b-1111-4222-8333-444455556666";
const std::string kName = "rootfs.ext4";
constexpr uint64_t kImageSize = 256 * kMiB;
constexpr uint64_t kSmallSize = 24 * kMiB;

std::string as_string(const std::vector<std::byte>& data) {
  return std::string(reinterpret_cast<const char*>(data.data()), data.size());
}

// Whether the file at `path` holds exactly `expected` (read in large
// blocks: these files are hundreds of MiB).
bool file_is(const std::filesystem::path& path, const std::string& expected) {
  const UniqueFd file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  const int fd = file.get();
  if (fd < 0) return false;
  std::vector<char> buffer(4 * kMiB);
  uint64_t at = 0;
  bool same = true;
  for (;;) {
    const ssize_t got = ::read(fd, buffer.data(), buffer.size());
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) break;
    if (at + static_cast<uint64_t>(got) > expected.size() ||
        std::memcmp(buffer.data(), expected.data() + at, static_cast<size_t>(got)) != 0) {
      same = false;
      break;
    }
    at += static_cast<uint64_t>(got);
  }
  return same && at == expected.size();
}

// Polls `done` (a real condition) every 5 ms for up to `seconds`.
bool eventually(const std::function<bool()>& done, int seconds = 30) {
  const auto until = std::chrono::steady_clock::now() + std::chrono::seconds(seconds);
  while (!done()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

// A tmpfs of `size` mounted at `path` for as long as it lives.
class SmallFilesystem {
 public:
  SmallFilesystem(const std::filesystem::path& path, const std::string& size) : path_(path) {
    std::filesystem::create_directories(path);
    const std::string options = "size=" + size;
    if (::mount("lazyblock-test", path.c_str(), "tmpfs", 0, options.c_str()) == 0) {
      mounted_ = true;
    } else {
      error_ = std::strerror(errno);
    }
  }
  ~SmallFilesystem() {
    if (mounted_) ::umount2(path_.c_str(), MNT_DETACH);
  }
  SmallFilesystem(const SmallFilesystem&) = delete;
  SmallFilesystem& operator=(const SmallFilesystem&) = delete;
  bool mounted() const { return mounted_; }
  const std::string& error() const { return error_; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  bool mounted_ = false;
  std::string error_;
};

// $TMPDIR set to `dir` for the commands the test runs, restored after.
class TmpdirFor {
 public:
  explicit TmpdirFor(const std::filesystem::path& dir) {
    if (const char* old = std::getenv("TMPDIR")) old_ = old;
    ::setenv("TMPDIR", dir.c_str(), 1);
  }
  ~TmpdirFor() {
    if (old_) {
      ::setenv("TMPDIR", old_->c_str(), 1);
    } else {
      ::unsetenv("TMPDIR");
    }
  }

 private:
  std::optional<std::string> old_;
};

// `lazyblock ARGS` in the background, stderr to `err`.
Result<testing::ChildProcess> start_logging(std::vector<std::string> args,
                                            const std::filesystem::path& err) {
  testing::SpawnOptions options;
  options.stderr_to = err;
  return start_lazyblock(std::move(args), options);
}

// Names of the entries of `dir` (not recursive) that contain `part`.
std::vector<std::string> entries_named(const std::filesystem::path& dir, const std::string& part) {
  std::vector<std::string> found;
  std::error_code error;
  for (auto it = std::filesystem::recursive_directory_iterator(dir, error);
       it != std::filesystem::recursive_directory_iterator(); it.increment(error)) {
    const std::string name = it->path().filename().string();
    if (name.find(part) != std::string::npos) found.push_back(name);
  }
  return found;
}

// Fills the filesystem at `dir` to the last byte with one file, `name`.
void fill(const std::filesystem::path& dir, const std::string& name) {
  const UniqueFd file(::open((dir / name).c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600));
  const int fd = file.get();
  ASSERT_GE(fd, 0) << std::strerror(errno);
  const std::vector<char> block(64 * 1024, 'x');
  for (;;) {
    const ssize_t put = ::write(fd, block.data(), block.size());
    if (put <= 0) break;
  }
}

class SpaceTest : public ::testing::Test {
 protected:
  // One store for every test: a 24 MiB build packed once, and a 256 MiB one
  // packed by the first test that asks for it (ctest runs each test in a
  // process of its own, and making and packing 256 MiB took most of the
  // time of the tests that never read it).
  static void SetUpTestSuite() {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    shared_ = new testing::ScratchDir(std::move(scratch).value());
    small_ = new std::string(as_string(testing::make_pattern(8, 0, kSmallSize)));
    pack_into_store(kSmallBuild, *small_);
  }
  static void pack_into_store(const std::string& build, const std::string& bytes) {
    Result<testing::PackedBuild> packed = testing::pack_build(
        {shared_->path() / "store", build, kName}, std::as_bytes(std::span(bytes)));
    ASSERT_TRUE(packed) << packed.status().to_string();
  }
  // kBuild, the 256 MiB image; call with ASSERT_NO_FATAL_FAILURE.
  static void use_large_image() {
    if (image_ != nullptr) return;
    image_ = new std::string(as_string(testing::make_pattern(7, 0, kImageSize)));
    pack_into_store(kBuild, *image_);
  }
  static void TearDownTestSuite() {
    delete shared_;
    delete image_;
    delete small_;
    shared_ = nullptr;
    image_ = nullptr;
  }
  static std::string store() { return "file://" + (shared_->path() / "store").string(); }

  void SetUp() override {
    ASSERT_NE(shared_, nullptr);
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
  }

  // A tmpfs of `size` at dir_/NAME; skips the test if mounting is refused.
  std::unique_ptr<SmallFilesystem> small_filesystem(const std::string& name,
                                                    const std::string& size) {
    auto fs = std::make_unique<SmallFilesystem>(dir_ / name, size);
    return fs;
  }

  std::string nbd_uri(const std::filesystem::path& socket) const {
    return "nbd+unix:///" + kName + "?socket=" + socket.string();
  }

  static inline testing::ScratchDir* shared_ = nullptr;
  static inline std::string* image_ = nullptr;
  static inline std::string* small_ = nullptr;
  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
};

#define REQUIRE_MOUNTED(fs)                                                             \
  if (!(fs)->mounted()) {                                                               \
    GTEST_SKIP() << "cannot mount a tmpfs at " << (fs)->path() << " (" << (fs)->error() \
                 << "): these tests need root";                                         \
  }

// The three tests of the 256 MiB image on a small filesystem are about
// space, not threads: they run in the plain and the ASan+UBSan builds and
// are skipped under TSan, where each took 45 s of CI's time. Threads meeting
// a full filesystem are TSan's in block_cache_test (FullFilesystemTest, and
// pins against punches).
#if defined(__SANITIZE_THREAD__)
#define SKIP_UNDER_TSAN() \
  GTEST_SKIP() << "about space, not threads: run in the plain and ASan builds"
#else
#define SKIP_UNDER_TSAN()
#endif

TEST_F(SpaceTest, ExportOfAnImageSixteenTimesTheSizeOfTmpdirIsByteExact) {
  SKIP_UNDER_TSAN();
  ASSERT_NO_FATAL_FAILURE(use_large_image());
  auto tmp = small_filesystem("tmp", "16m");
  REQUIRE_MOUNTED(tmp);
  TmpdirFor tmpdir(tmp->path());
  const std::filesystem::path output = dir_ / "exported";
  // Two streams, one chunk each, ahead of the copy: an 8 MiB window.
  Outcome exported = run_lazyblock(dir_, {"export", "--store", store(), "--build", kBuild, "--name",
                                          kName, "--parallel", "2", "-o", output.string()});
  ASSERT_EQ(exported.status, 0) << exported.err;
  EXPECT_TRUE(file_is(output, *image_)) << "wrong bytes";
  EXPECT_TRUE(std::filesystem::is_empty(tmp->path())) << "left in $TMPDIR";
}

TEST_F(SpaceTest, CatOfAnObjectSixteenTimesTheSizeOfTmpdirIsByteExact) {
  SKIP_UNDER_TSAN();
  ASSERT_NO_FATAL_FAILURE(use_large_image());
  auto tmp = small_filesystem("tmp", "16m");
  REQUIRE_MOUNTED(tmp);
  TmpdirFor tmpdir(tmp->path());
  const std::filesystem::path output = dir_ / "catted";
  Outcome catted = run_lazyblock(dir_, {"cat", "--store", store(), "--key", kBuild + "/" + kName,
                                        "--parallel", "2", "-o", output.string()});
  ASSERT_EQ(catted.status, 0) << catted.err;
  EXPECT_TRUE(file_is(output, *image_)) << "wrong bytes";
}

// The block cache of `serve nbd` on a 32 MiB filesystem, for a 256 MiB
// disk: full with someone else's file, a read fails (EIO) and the server
// stays up; once that file is gone, a full read succeeds, the cache giving
// back its least recently used blocks as it goes (eight times over).
TEST_F(SpaceTest, ServeNbdOnASmallFullTmpdirFailsReadsUntilThereIsSpaceThenServesEverything) {
  SKIP_UNDER_TSAN();
  ASSERT_NO_FATAL_FAILURE(use_large_image());
  auto tmp = small_filesystem("tmp", "32m");
  REQUIRE_MOUNTED(tmp);
  TmpdirFor tmpdir(tmp->path());
  const std::filesystem::path socket = dir_ / "nbd.sock";
  ServerProcess server(dir_,
                       {"serve", "nbd", "--store", store(), "--build", kBuild, "--name", kName,
                        "--socket", socket.string(), "--read-only"},
                       socket);
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  fill(tmp->path(), "filler");
  Outcome refused =
      run_program(dir_, "timeout", {"60", "nbdcopy", nbd_uri(socket), (dir_ / "copy").string()});
  EXPECT_NE(refused.status, 0) << "a read succeeded with no space at all for its blocks";
  EXPECT_NE(refused.status, 124) << "the read hung";
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  EXPECT_NE(slurp(dir_ / "server.log").find("No space left on device"), std::string::npos)
      << slurp(dir_ / "server.log");

  std::filesystem::remove(tmp->path() / "filler");
  std::filesystem::remove(dir_ / "copy");
  Outcome copied =
      run_program(dir_, "timeout", {"120", "nbdcopy", nbd_uri(socket), (dir_ / "copy").string()});
  ASSERT_EQ(copied.status, 0) << copied.err << slurp(dir_ / "server.log");
  EXPECT_TRUE(file_is(dir_ / "copy", *image_)) << "wrong bytes";
  EXPECT_EQ(server.stop(), 0) << slurp(dir_ / "server.log");
}

// The block cache's file cut short under `cat` and `export` (as a failing
// disk would make its map fault): the copy fetches what it lost and ends
// byte-exact, or fails with an I/O error naming the object and offset;
// never a crash.
TEST_F(SpaceTest, ACacheFileCutShortUnderACopyIsFetchedAgainOrAnIoErrorNeverACrash) {
  const std::filesystem::path tmp = dir_ / "tmp";
  std::filesystem::create_directories(tmp);
  TmpdirFor tmpdir(tmp);
  const std::string key = kSmallBuild + "/" + kName;
  const std::vector<std::vector<std::string>> commands = {
      {"cat", "--key", key},
      {"export", "--build", kSmallBuild, "--name", kName},
  };
  const std::filesystem::path out_dir = dir_ / "out";
  std::filesystem::create_directories(out_dir);
  for (std::vector<std::string> args : commands) {
    const std::string command = args[0];
    const std::filesystem::path output = out_dir / command;
    // Slow enough (~1 s) for the cut to land mid-copy.
    args.insert(args.end(), {"--store", store(), "--simulate", "ttfb=5ms,bw=10MB/s", "--parallel",
                             "2", "-o", output.string()});
    const std::filesystem::path err = dir_ / (command + ".err");
    Result<testing::ChildProcess> copy = start_logging(args, err);
    ASSERT_TRUE(copy) << copy.status().to_string();
    const pid_t pid = copy->pid();
    // Once some blocks are cached, with three chunks or more still to be
    // written out (so that the copy meets the cut), the cache file is cut
    // to nothing. The file is opened as soon as it is found: a descriptor
    // that ends between the listing and the open is looked for again.
    UniqueFd cache_file;
    ASSERT_TRUE(eventually([&] {
      uint64_t written = 0;
      for (const std::filesystem::path& file : testing::unnamed_files_of(pid, out_dir)) {
        struct stat st {};
        if (::stat(file.c_str(), &st) == 0) written += static_cast<uint64_t>(st.st_size);
      }
      if (written + 3 * 4 * kMiB > kSmallSize) return false;
      for (const std::filesystem::path& candidate : testing::unnamed_files_of(pid, tmp)) {
        struct stat st {};
        if (::stat(candidate.c_str(), &st) == 0 && st.st_blocks > 0) {
          cache_file.reset(::open(candidate.c_str(), O_WRONLY));
          if (cache_file) return true;
        }
      }
      return false;
    })) << command
        << ": no cache file with blocks in it early enough";
    ASSERT_EQ(::ftruncate(cache_file.get(), 0), 0) << std::strerror(errno);
    cache_file.reset();
    const int status = copy->wait();
    const std::string log = slurp(err);
    ASSERT_LT(status, 128) << command << " was killed by signal " << status - 128 << ": " << log;
    if (status == 0) {
      EXPECT_TRUE(file_is(output, *small_)) << command << ": wrong bytes";
    } else {
      EXPECT_EQ(status, 1) << log;
      EXPECT_NE(log.find(key), std::string::npos) << log;
      EXPECT_NE(log.find("could not be read at ["), std::string::npos) << log;
    }
#if !defined(__SANITIZE_THREAD__)
    // The cut was met, not missed. (Under TSan the copy has been seen to end
    // byte-exact without meeting it, not yet understood: there only the
    // outcome is checked.)
    EXPECT_TRUE(log.find("could not be read") != std::string::npos ||
                log.find("cut short") != std::string::npos)
        << command << ": " << log;
#endif
  }
}

// kill -9 of `serve nbd --cache-dir` while a chunk is being filled leaves
// its temporary file; the next run removes it and serves the right bytes.
TEST_F(SpaceTest, AServeNbdKilledMidFillLeavesNoTemporaryFileAfterTheNextRun) {
  const std::filesystem::path cache = dir_ / "chunks";
  const std::filesystem::path socket = dir_ / "nbd.sock";
  const std::vector<std::string> args = {
      "serve", "nbd",      "--store",       store(),       "--build",     kSmallBuild,   "--name",
      kName,   "--socket", socket.string(), "--read-only", "--cache-dir", cache.string()};
  std::string mark;
  {
    std::vector<std::string> stalling = args;
    stalling.insert(stalling.end(), {"--faults", "stall-after=1MiB", "--timeout", "60s"});
    ServerProcess server(dir_, stalling, socket);
    ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
    mark = ".tmp." + std::to_string(server.pid()) + ".";
    // A read that waits on the stalled fill; its client ends when the
    // server is killed.
    const std::filesystem::path client_dir = dir_ / "client";
    std::filesystem::create_directories(client_dir);
    std::thread reader([&] {
      run_program(client_dir, "timeout", {"60", "nbdcopy", nbd_uri(socket), "null:"});
    });
    const bool filling = eventually([&] { return !entries_named(cache, mark).empty(); });
    server.kill_hard();
    reader.join();
    ASSERT_TRUE(filling) << "no chunk was being filled: " << slurp(dir_ / "server.log");
    ASSERT_FALSE(entries_named(cache, mark).empty());
  }
  ServerProcess server(dir_, args, socket);
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  EXPECT_TRUE(entries_named(cache, mark).empty()) << "the killed server's files remain";
  Outcome copied = run_program(dir_, "nbdcopy", {nbd_uri(socket), (dir_ / "copy").string()});
  ASSERT_EQ(copied.status, 0) << copied.err;
  EXPECT_TRUE(file_is(dir_ / "copy", *small_)) << "wrong bytes";
  EXPECT_EQ(server.stop(), 0) << slurp(dir_ / "server.log");
  EXPECT_TRUE(entries_named(cache, ".tmp.").empty()) << "the server left its own";
}

// kill -9 of `cat -o FILE` mid-fill leaves nothing beside FILE's place
// (the output is written to an unnamed file until it is complete); the
// next run writes FILE whole.
TEST_F(SpaceTest, ACatKilledMidFillLeavesNoPartialFile) {
  const std::filesystem::path out_dir = dir_ / "out";
  std::filesystem::create_directories(out_dir);
  const std::filesystem::path output = out_dir / "object";
  const std::string key = kSmallBuild + "/" + kName;
  // Slow (~1 s): killed once its first chunk is written.
  Result<testing::ChildProcess> cat =
      start_logging({"cat", "--store", store(), "--key", key, "--simulate", "ttfb=5ms,bw=20MB/s",
                     "--parallel", "1", "-o", output.string()},
                    dir_ / "cat.err");
  ASSERT_TRUE(cat) << cat.status().to_string();
  const pid_t pid = cat->pid();
  // Mid-fill: the output has its first bytes (in an unnamed file, or in
  // any file of the directory for a command that names its partial file).
  const bool filling = eventually([&] {
    std::vector<std::filesystem::path> files = testing::unnamed_files_of(pid, out_dir);
    for (const auto& entry : std::filesystem::directory_iterator(out_dir)) {
      files.push_back(entry.path());
    }
    for (const std::filesystem::path& file : files) {
      struct stat st {};
      if (::stat(file.c_str(), &st) == 0 && st.st_size > 0) return true;
    }
    return false;
  });
  EXPECT_EQ(cat->kill_hard(), 128 + SIGKILL);
  ASSERT_TRUE(filling) << slurp(dir_ / "cat.err");
  const std::vector<std::string> left = entries_named(out_dir, "");
  EXPECT_TRUE(left.empty()) << "left behind: " << left[0];
  Outcome again =
      run_lazyblock(dir_, {"cat", "--store", store(), "--key", key, "-o", output.string()});
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_TRUE(file_is(output, *small_));
  EXPECT_EQ(entries_named(out_dir, "").size(), 1u) << "more than the output in its directory";
}

}  // namespace
}  // namespace lazyblock
