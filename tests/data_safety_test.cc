// What lazyblock must never do to a user's data, tried through the command
// as a user runs it: lose an acknowledged flush (kill -9 at random moments
// under load), serve or pack an overlay over the wrong device or from two
// processes, replace a device, FIFO, symlink, socket or build it did not
// create.
#include <fcntl.h>
#include <libnbd.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "common/units.h"
#include "testing/build_fixture.h"
#include "testing/local_port.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

const std::string kBuild = "5a5a5a5a-1111-4222-8333-444455556666";
const std::string kOtherBuild = "5b5b5b5b-1111-4222-8333-444455556666";
const std::string kChild = "5c5c5c5c-1111-4222-8333-444455556666";
const std::string kName = "rootfs.ext4";
constexpr uint64_t kBlock = 4096;

// A libnbd connection (a real NBD client library), closed on destruction.
class NbdClient {
 public:
  explicit NbdClient(const std::string& uri) : handle_(nbd_create()) {
    if (handle_ != nullptr && nbd_connect_uri(handle_, uri.c_str()) != 0) {
      error_ = nbd_get_error();
      nbd_close(handle_);
      handle_ = nullptr;
    }
  }
  ~NbdClient() {
    if (handle_ != nullptr) nbd_close(handle_);
  }
  bool connected() const { return handle_ != nullptr; }
  const std::string& error() const { return error_; }
  // 0 on success, else the errno libnbd reports.
  int write(const std::vector<std::byte>& data, uint64_t offset) {
    return result(nbd_pwrite(handle_, data.data(), data.size(), offset, 0));
  }
  int flush() { return result(nbd_flush(handle_, 0)); }
  int read(std::vector<std::byte>& data, uint64_t offset) {
    return result(nbd_pread(handle_, data.data(), data.size(), offset, 0));
  }

 private:
  int result(int rc) {
    if (rc == 0) return 0;
    error_ = nbd_get_error() ? nbd_get_error() : "";
    return nbd_get_errno() != 0 ? nbd_get_errno() : EIO;
  }
  struct nbd_handle* handle_;
  std::string error_;
};

// The block a write stamps: which block, which write (seq), then bytes that
// are a function of both, so a torn or misplaced block is caught.
std::vector<std::byte> stamped_block(uint64_t block, uint64_t seq) {
  std::vector<std::byte> data(kBlock);
  std::mt19937_64 rng(block * 1000003 + seq);
  for (size_t i = 0; i < data.size(); i += 8) {
    uint64_t word = rng();
    std::memcpy(data.data() + i, &word, 8);
  }
  std::memcpy(data.data(), &block, 8);
  std::memcpy(data.data() + 8, &seq, 8);
  return data;
}

// The seq of a block stamped whole by stamped_block, or nullopt.
std::optional<uint64_t> stamp_of(const std::vector<std::byte>& data, uint64_t block) {
  uint64_t found_block, seq;
  std::memcpy(&found_block, data.data(), 8);
  std::memcpy(&seq, data.data() + 8, 8);
  if (found_block != block || seq == 0) return std::nullopt;
  if (data != stamped_block(block, seq)) return std::nullopt;
  return seq;
}

class DataSafetyTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    std::mt19937_64 rng(7);
    raw_.assign(8 * kMiB, '\0');
    for (size_t i = 0; i < raw_.size(); ++i) {
      if ((i / kBlock) % 4 != 1) raw_[i] = static_cast<char>(rng());
    }
    pack(kBuild, dir_ / "raw");
  }

  // raw_ packed as `build` (its raw image kept at `raw`, if given).
  void pack(const std::string& build, const std::filesystem::path& raw = {}) {
    testing::BuildSpec spec(dir_ / "store", build, kName);
    spec.raw = raw;
    Result<testing::PackedBuild> packed = testing::pack_build(spec, std::as_bytes(std::span(raw_)));
    ASSERT_TRUE(packed) << packed.status().to_string();
    store_ = packed->store_url;
  }

  std::vector<std::string> serve_args(const std::string& build, const std::filesystem::path& socket,
                                      std::vector<std::string> extra) {
    std::vector<std::string> args = {"serve", "nbd",    "--store", store_,     "--build",
                                     build,   "--name", kName,     "--socket", socket.string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  static std::string uri(const std::filesystem::path& socket) {
    return "nbd+unix:///" + kName + "?socket=" + socket.string();
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::string store_;
  std::string raw_;
};

// Writers on 8 connections, each stamping its own blocks and flushing after
// every write; what each flush acknowledged is kept here, in the test's own
// memory, which outlives the server.
class FlushLoad {
 public:
  static constexpr int kConnections = 8;
  static constexpr uint64_t kBlocksEach = 32;

  explicit FlushLoad(std::string uri) : uri_(std::move(uri)) {}

  // Runs the writers until `flushes` more are acknowledged or the server
  // goes; then `at_target` runs (e.g. a kill), and the writers are joined.
  void run(uint64_t flushes, const std::function<void()>& at_target) {
    std::atomic<uint64_t> acked_now{0};
    std::atomic<int> live{kConnections};
    std::atomic<bool> stop{false};
    std::mutex target_mu;
    std::condition_variable target_cv;
    std::vector<std::thread> writers;
    const auto wake = [&] {
      std::lock_guard lock(target_mu);
      target_cv.notify_all();
    };
    for (int c = 0; c < kConnections; ++c) {
      writers.emplace_back([&, c] {
        write_until_stopped(c, stop, acked_now, flushes, wake);
        if (live.fetch_sub(1) == 1) wake();  // the target cannot come any more
      });
    }
    {
      std::unique_lock lock(target_mu);
      target_cv.wait(lock, [&] { return acked_now.load() >= flushes || live.load() == 0; });
    }
    stop.store(true);
    at_target();
    for (std::thread& writer : writers) writer.join();
  }

  void write_until_stopped(int c, const std::atomic<bool>& stop, std::atomic<uint64_t>& acked_now,
                           uint64_t flushes, const std::function<void()>& wake) {
    NbdClient client(uri_);
    if (!client.connected()) {
      if (!stop.load()) failed_flushes_.fetch_add(1);
      return;
    }
    for (uint64_t i = 0; !stop.load(); ++i) {
      const uint64_t block = static_cast<uint64_t>(c) + kConnections * (i % kBlocksEach);
      const uint64_t seq = next_seq_.fetch_add(1) + 1;
      if (client.write(stamped_block(block, seq), block * kBlock) != 0) return;
      const int flushed = client.flush();
      if (flushed != 0) {
        if (!stop.load()) failed_flushes_.fetch_add(1);
        return;
      }
      {
        std::lock_guard lock(mu_);
        uint64_t& acked = acked_[block];
        acked = std::max(acked, seq);
      }
      acked_flushes_.fetch_add(1);
      if (acked_now.fetch_add(1) + 1 == flushes) wake();
    }
  }

  // Failed flushes while the server was meant to be up.
  uint64_t failed_flushes() const { return failed_flushes_.load(); }
  uint64_t acked_flushes() const { return acked_flushes_.load(); }
  std::map<uint64_t, uint64_t> acked() {
    std::lock_guard lock(mu_);
    return acked_;
  }

 private:
  const std::string uri_;
  std::atomic<uint64_t> next_seq_{0};
  std::atomic<uint64_t> failed_flushes_{0};
  std::atomic<uint64_t> acked_flushes_{0};
  std::mutex mu_;
  std::map<uint64_t, uint64_t> acked_;  // block -> highest seq whose flush was acknowledged
};

TEST_F(DataSafetyTest, AcknowledgedFlushesSurviveKillNineAtRandomMoments) {
  const std::filesystem::path socket = dir_ / "nbd.sock";
  const std::filesystem::path overlay = dir_ / "vm.overlay";
  const std::vector<std::string> args = serve_args(kBuild, socket, {"--overlay", overlay.string()});
  FlushLoad load(uri(socket));
  {
    // A while of flushes on 8 connections: not one may fail.
    ServerProcess server(dir_, args, socket);
    ASSERT_TRUE(server.running());
    load.run(800, [] {});
    EXPECT_EQ(load.failed_flushes(), 0u);
    EXPECT_EQ(server.stop(), 0);
  }
  std::random_device seed_source;
  const unsigned seed = seed_source();
  std::mt19937 rng(seed);
  // The rounds are about the moments of the kills: the plain and ASan+UBSan
  // builds run all 50; under TSan (where a round takes ~0.5 s) 10
  // see the restart after a kill free of races.
#if defined(__SANITIZE_THREAD__)
  constexpr int kRounds = 10;
#else
  constexpr int kRounds = 50;
#endif
  std::printf("%d kill -9 rounds with seed %u\n", kRounds, seed);
  for (int round = 0; round < kRounds; ++round) {
    ServerProcess server(dir_, args, socket);
    ASSERT_TRUE(server.running()) << "round " << round << ": " << slurp(dir_ / "server.log");
    // The moment: after a random number of acknowledged flushes.
    load.run(std::uniform_int_distribution<uint64_t>(1, 40)(rng), [&] { server.kill_hard(); });
  }
  std::printf("%llu flushes acknowledged in all\n",
              static_cast<unsigned long long>(load.acked_flushes()));
  ServerProcess server(dir_, args, socket);
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  NbdClient reader(uri(socket));
  ASSERT_TRUE(reader.connected()) << reader.error();
  for (const auto& [block, seq] : load.acked()) {
    std::vector<std::byte> data(kBlock);
    ASSERT_EQ(reader.read(data, block * kBlock), 0) << reader.error();
    const std::optional<uint64_t> found = stamp_of(data, block);
    ASSERT_TRUE(found) << "block " << block << " is not a whole write (acknowledged seq " << seq
                       << ")";
    EXPECT_GE(*found, seq) << "block " << block << " lost its acknowledged write";
  }
  EXPECT_EQ(server.stop(), 0);
}

TEST_F(DataSafetyTest, AnOverlayHasOneServerAndBelongsToOneDevice) {
  const std::filesystem::path overlay = dir_ / "vm.overlay";
  ServerProcess first(dir_, serve_args(kBuild, dir_ / "a.sock", {"--overlay", overlay.string()}),
                      dir_ / "a.sock");
  ASSERT_TRUE(first.running());
  {
    NbdClient client(uri(dir_ / "a.sock"));
    ASSERT_TRUE(client.connected());
    ASSERT_EQ(client.write(stamped_block(3, 1), 3 * kBlock), 0);
    ASSERT_EQ(client.flush(), 0);
  }
  // A second server on the same overlay, and a pack of it while served.
  Outcome second = run_lazyblock_bounded(
      dir_, serve_args(kBuild, dir_ / "b.sock", {"--overlay", overlay.string()}));
  EXPECT_EQ(second.status, 1) << second.err;
  EXPECT_NE(second.err.find("in use by another lazyblock process"), std::string::npos)
      << second.err;
  Outcome packed = run_lazyblock(dir_, {"pack", "--store", store_, "--build", kChild, "--parent",
                                        kBuild, "--name", kName, "--overlay", overlay.string()});
  EXPECT_EQ(packed.status, 1) << packed.err;
  EXPECT_NE(packed.err.find("in use"), std::string::npos) << packed.err;
  EXPECT_EQ(first.stop(), 0);

  // Over another build: refused, both named.
  pack(kOtherBuild);
  Outcome other = run_lazyblock_bounded(
      dir_, serve_args(kOtherBuild, dir_ / "c.sock", {"--overlay", overlay.string()}));
  EXPECT_NE(other.status, 0);
  EXPECT_NE(other.err.find(kBuild), std::string::npos) << other.err;
  EXPECT_NE(other.err.find(kOtherBuild), std::string::npos) << other.err;
  Outcome other_pack =
      run_lazyblock(dir_, {"pack", "--store", store_, "--build", kChild, "--parent", kOtherBuild,
                           "--name", kName, "--overlay", overlay.string()});
  EXPECT_NE(other_pack.status, 0);
  EXPECT_NE(other_pack.err.find(kBuild), std::string::npos) << other_pack.err;
  EXPECT_NE(other_pack.err.find(kOtherBuild), std::string::npos) << other_pack.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "store" / kChild));

  // The data file gone, its map kept: refused, not served as base data.
  std::filesystem::remove(overlay);
  Outcome missing = run_lazyblock_bounded(
      dir_, serve_args(kBuild, dir_ / "d.sock", {"--overlay", overlay.string()}));
  EXPECT_EQ(missing.status, 1) << missing.err;
  EXPECT_NE(missing.err.find("data file is missing"), std::string::npos) << missing.err;
  EXPECT_FALSE(std::filesystem::exists(overlay)) << "a new data file was created";
}

TEST_F(DataSafetyTest, AFullOverlayDiskIsEnospcAndRecoversOnceThereIsSpace) {
  if (::geteuid() != 0) GTEST_SKIP() << "mounting a small tmpfs needs root";
  const std::filesystem::path small = dir_ / "small";
  std::filesystem::create_directories(small);
  ASSERT_EQ(::mount("lazyblock-test", small.c_str(), "tmpfs", 0, "size=2m"), 0) << strerror(errno);
  struct Unmount {
    std::filesystem::path path;
    ~Unmount() { ::umount2(path.c_str(), MNT_DETACH); }
  } unmount{small};
  const std::filesystem::path overlay = small / "vm.overlay";
  const std::filesystem::path socket = dir_ / "nbd.sock";
  const std::vector<std::string> args = serve_args(kBuild, socket, {"--overlay", overlay.string()});
  uint64_t flushed_blocks = 0;
  {
    ServerProcess server(dir_, args, socket);
    ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
    NbdClient client(uri(socket));
    ASSERT_TRUE(client.connected());
    int error = 0;
    for (uint64_t block = 0; block < 1024 && error == 0; ++block) {
      error = client.write(stamped_block(block, 1), block * kBlock);
      if (error == 0) error = client.flush();
      if (error == 0) flushed_blocks = block + 1;
    }
    EXPECT_EQ(error, ENOSPC) << client.error();
    EXPECT_GT(flushed_blocks, 0u);
    server.stop();
  }
  ASSERT_EQ(::mount(nullptr, small.c_str(), nullptr, MS_REMOUNT, "size=16m"), 0) << strerror(errno);
  ServerProcess server(dir_, args, socket);
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  NbdClient client(uri(socket));
  ASSERT_TRUE(client.connected());
  for (uint64_t block = 0; block < flushed_blocks; ++block) {
    std::vector<std::byte> data(kBlock);
    ASSERT_EQ(client.read(data, block * kBlock), 0);
    ASSERT_EQ(stamp_of(data, block), std::optional<uint64_t>(1)) << "block " << block;
  }
  EXPECT_EQ(client.write(stamped_block(flushed_blocks, 2), flushed_blocks * kBlock), 0);
  EXPECT_EQ(client.flush(), 0) << client.error();
  EXPECT_EQ(server.stop(), 0);
}

TEST_F(DataSafetyTest, OutputsThatAreNotRegularFilesAreWrittenInPlaceAndKept) {
  const std::vector<std::string> exported = {"export", "--store", store_, "--build",
                                             kBuild,   "--name",  kName};
  // A character device (a private /dev/null, so the real one is never at risk).
  if (::geteuid() == 0) {
    const std::filesystem::path null = dir_ / "null";
    ASSERT_EQ(::mknod(null.c_str(), S_IFCHR | 0666, makedev(1, 3)), 0) << strerror(errno);
    std::vector<std::string> args = exported;
    args.insert(args.end(), {"-o", null.string()});
    Outcome wrote = run_lazyblock(dir_, args);
    EXPECT_EQ(wrote.status, 0) << wrote.err;
    struct stat st {};
    ASSERT_EQ(::stat(null.c_str(), &st), 0);
    EXPECT_TRUE(S_ISCHR(st.st_mode)) << "the device was replaced";
  }
  // A FIFO read by another process.
  const std::filesystem::path fifo = dir_ / "fifo";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  std::string received;
  std::thread reader([&] { received = slurp(fifo); });
  std::vector<std::string> to_fifo = exported;
  to_fifo.insert(to_fifo.end(), {"-o", fifo.string()});
  Outcome through_fifo = run_lazyblock(dir_, to_fifo);
  // Had the export failed before opening the FIFO, this lets the reader go.
  UniqueFd(::open(fifo.c_str(), O_WRONLY | O_NONBLOCK)).reset();
  reader.join();
  EXPECT_EQ(through_fifo.status, 0) << through_fifo.err;
  EXPECT_TRUE(received == raw_) << received.size() << " bytes through the FIFO";
  EXPECT_TRUE(std::filesystem::is_fifo(std::filesystem::symlink_status(fifo)));
  // A symlink: its target receives the bytes, the link stays.
  const std::filesystem::path target = dir_ / "target.img";
  const std::filesystem::path link = dir_ / "link.img";
  std::ofstream(target) << "old";
  std::filesystem::permissions(target, std::filesystem::perms(0640));
  std::filesystem::create_symlink(target, link);
  std::vector<std::string> to_link = exported;
  to_link.insert(to_link.end(), {"-o", link.string()});
  Outcome through_link = run_lazyblock(dir_, to_link);
  EXPECT_EQ(through_link.status, 0) << through_link.err;
  EXPECT_TRUE(std::filesystem::is_symlink(link));
  EXPECT_TRUE(slurp(target) == raw_);
  EXPECT_EQ(std::filesystem::status(target).permissions(), std::filesystem::perms(0640))
      << "an existing file keeps its mode";
  // A directory, and a directory that does not exist: refused, nothing made.
  std::vector<std::string> to_dir = exported;
  to_dir.insert(to_dir.end(), {"-o", dir_.string()});
  EXPECT_NE(run_lazyblock(dir_, to_dir).status, 0);
  std::vector<std::string> to_nowhere = exported;
  to_nowhere.insert(to_nowhere.end(), {"-o", (dir_ / "no" / "such" / "dir" / "x").string()});
  Outcome nowhere = run_lazyblock(dir_, to_nowhere);
  EXPECT_NE(nowhere.status, 0);
  EXPECT_NE(nowhere.err.find("does not exist"), std::string::npos) << nowhere.err;
}

TEST_F(DataSafetyTest, ASocketPathIsTakenOnlyFromADeadServer) {
  // A regular file where the socket should go: refused and kept.
  const std::filesystem::path file = dir_ / "not-a-socket";
  std::ofstream(file) << "precious";
  Outcome on_file = run_lazyblock_bounded(dir_, serve_args(kBuild, file, {}));
  EXPECT_EQ(on_file.status, 1) << on_file.err;
  EXPECT_NE(on_file.err.find("not a socket"), std::string::npos) << on_file.err;
  EXPECT_EQ(slurp(file), "precious");
  // A live socket: the second server is refused, the first keeps serving.
  const std::filesystem::path socket = dir_ / "live.sock";
  ServerProcess first(dir_, serve_args(kBuild, socket, {}), socket);
  ASSERT_TRUE(first.running());
  Outcome second = run_lazyblock_bounded(dir_, serve_args(kBuild, socket, {}));
  EXPECT_EQ(second.status, 1) << second.err;
  EXPECT_NE(second.err.find("already in use by another server"), std::string::npos) << second.err;
  Outcome info = run_program(dir_, "nbdinfo", {"--size", uri(socket)});
  EXPECT_EQ(info.status, 0) << info.err;
  EXPECT_EQ(first.stop(), 0);
  // A socket left by a server killed hard is taken over.
  ServerProcess killed(dir_, serve_args(kBuild, socket, {}), socket);
  ASSERT_TRUE(killed.running());
  killed.kill_hard();
  ServerProcess next(dir_, serve_args(kBuild, socket, {}), socket);
  EXPECT_TRUE(next.running()) << slurp(dir_ / "server.log");
  EXPECT_EQ(next.stop(), 0);
  EXPECT_FALSE(std::filesystem::exists(socket)) << "a server removes its own socket";
}

TEST_F(DataSafetyTest, BuildsAreNeverReplacedUnasked) {
  const std::filesystem::path header = dir_ / "store" / kBuild / (kName + ".header");
  const std::filesystem::path data = dir_ / "store" / kBuild / kName;
  const std::string before = slurp(header);
  const std::string data_before = slurp(data);
  std::string changed = raw_;
  changed[5] ^= 1;
  std::ofstream(dir_ / "changed", std::ios::binary) << changed;
  Outcome again = run_lazyblock(dir_, {"pack", "--store", store_, "--build", kBuild, "--name",
                                       kName, (dir_ / "changed").string()});
  EXPECT_EQ(again.status, 1) << again.err;
  EXPECT_NE(again.err.find("--force"), std::string::npos) << again.err;
  EXPECT_TRUE(slurp(header) == before);
  EXPECT_TRUE(slurp(data) == data_before);
  Outcome itself = run_lazyblock(dir_, {"pack", "--store", store_, "--build", kChild, "--parent",
                                        kChild, "--name", kName, (dir_ / "changed").string()});
  EXPECT_NE(itself.status, 0);
  EXPECT_NE(itself.err.find("is the build itself"), std::string::npos) << itself.err;
  Outcome forced = run_lazyblock(dir_, {"pack", "--store", store_, "--build", kBuild, "--name",
                                        kName, "--force", (dir_ / "changed").string()});
  EXPECT_EQ(forced.status, 0) << forced.err;
  EXPECT_TRUE(slurp(data) != data_before) << "--force did not replace the build";
  // A store directory that does not exist yet is made by pack.
  const std::string fresh = "file://" + (dir_ / "fresh" / "store").string();
  Outcome made = run_lazyblock(dir_, {"pack", "--store", fresh, "--build", kBuild, "--name", kName,
                                      (dir_ / "raw").string()});
  EXPECT_EQ(made.status, 0) << made.err;
}

TEST_F(DataSafetyTest, AnOverlayRewrittenWithTheParentsBytesStoresNoChangedBlocks) {
  const std::filesystem::path socket = dir_ / "nbd.sock";
  const std::filesystem::path overlay = dir_ / "vm.overlay";
  {
    ServerProcess server(dir_, serve_args(kBuild, socket, {"--overlay", overlay.string()}), socket);
    ASSERT_TRUE(server.running());
    // Every block written, with the bytes it already had.
    Outcome converted = run_program(dir_, "qemu-img",
                                    {"convert", "-n", "-f", "raw", "-O", "raw", "-S", "0",
                                     (dir_ / "raw").string(), uri(socket)});
    ASSERT_EQ(converted.status, 0) << converted.err;
    EXPECT_EQ(server.stop(), 0);
  }
  Outcome packed = run_lazyblock(dir_, {"pack", "--store", store_, "--build", kChild, "--parent",
                                        kBuild, "--name", kName, "--overlay", overlay.string()});
  ASSERT_EQ(packed.status, 0) << packed.err;
  EXPECT_NE(packed.out.find(" 0 changed"), std::string::npos) << packed.out;
  Outcome exported = run_lazyblock(dir_, {"export", "--store", store_, "--build", kChild, "--name",
                                          kName, "-o", (dir_ / "out").string()});
  ASSERT_EQ(exported.status, 0) << exported.err;
  EXPECT_TRUE(slurp(dir_ / "out") == raw_);
}

}  // namespace
}  // namespace lazyblock
