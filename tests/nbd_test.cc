// `lazyblock serve nbd` driven by real NBD clients (libnbd's nbdinfo and
// nbdcopy, qemu-img, qemu-io) and by a raw client that sends what a broken
// or hostile one would.
#include <fcntl.h>
#include <linux/sockios.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/unique_fd.h"
#include "common/units.h"
#include "image/frame_table.h"
#include "testing/build_fixture.h"
#include "testing/local_port.h"
#include "testing/scratch_dir.h"
#include "testing/unnamed_files.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

const std::string kBuild = "7a7a7a7a-1111-4222-8333-444455556666";
const std::string kChild = "7b7b7b7b-1111-4222-8333-444455556666";
const std::string kName = "rootfs.ext4";

// `lazyblock serve nbd` of the test's build, on a socket in `dir`.
class Server : public ServerProcess {
 public:
  Server(const std::filesystem::path& dir, const std::string& store, std::vector<std::string> extra)
      : ServerProcess(dir,
                      with(extra, {"serve", "nbd", "--store", store, "--build", kBuild, "--name",
                                   kName, "--socket", (dir / "nbd.sock").string()}),
                      dir / "nbd.sock") {}
  std::string uri() const { return "nbd+unix:///" + kName + "?socket=" + socket().string(); }

 private:
  static std::vector<std::string> with(const std::vector<std::string>& extra,
                                       std::vector<std::string> args) {
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }
};

// Frames of a compressed build: a quarter of the 4 MiB chunk, so that the
// test's 6 MiB disk is stored in many.
constexpr uint64_t kFrameSize = 256 * kKiB;

// The build that `lazyblock serve nbd` serves, packed with the suite's
// parameter as its data file's codec: every test runs over a plain and a
// compressed build.
class NbdTest : public ::testing::TestWithParam<image::Codec> {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    // 6 MiB + 512 bytes of blocks of random data, of text (which a codec
    // compresses, each block naming itself) and zero holes.
    std::mt19937_64 rng(9);
    raw_.assign(6 * kMiB + 512, '\0');
    std::string text;
    for (size_t i = 0; i < raw_.size(); ++i) {
      const size_t block = i / 4096;
      if (block % 5 == 2) continue;
      if (block % 5 == 4) {
        if (i % 4096 == 0) text = "block " + std::to_string(block) + " of the test's disk\n";
        raw_[i] = text[i % 4096 % text.size()];
      } else {
        raw_[i] = static_cast<char>(rng());
      }
    }
    testing::BuildSpec spec = build_spec(dir_ / "store");
    spec.raw = dir_ / "raw";  // qemu-img compares the served disk with it
    Result<testing::PackedBuild> packed = testing::pack_build(spec, std::as_bytes(std::span(raw_)));
    ASSERT_TRUE(packed) << packed.status().to_string();
    store_ = packed->store_url;
    data_key_ = packed->data_key;
    // The suite's codec took: the data file is the one a compressed build has.
    ASSERT_EQ(data_key_, kBuild + "/" + kName + std::string(image::data_file_suffix(GetParam())));
  }

  // Build kBuild's device kName in the store at `store`, in the suite's codec.
  static testing::BuildSpec build_spec(const std::filesystem::path& store) {
    testing::BuildSpec spec(store, kBuild, kName);
    spec.codec = GetParam();
    spec.frame_size = kFrameSize;
    return spec;
  }

  // The build's header and data file (BUILD/NAME, or BUILD/NAME.zstd), as stored.
  std::string stored_objects() {
    return slurp(dir_ / "store" / data_key_) + slurp(dir_ / "store" / kBuild / (kName + ".header"));
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::string store_;
  std::string data_key_;
  std::string raw_;
};

// Named as the codecs are on the command line: none, zstd, lz4.
INSTANTIATE_TEST_SUITE_P(Codec, NbdTest,
                         ::testing::Values(image::Codec::kNone, image::Codec::kZstd),
                         [](const ::testing::TestParamInfo<image::Codec>& info) {
                           return std::string(image::codec_name(info.param));
                         });

TEST_P(NbdTest, StandardClientsSeeTheDisk) {
  Server server(dir_, store_, {});
  ASSERT_TRUE(server.running());
  Outcome info = run_program(dir_, "nbdinfo", {"--json", server.uri()});
  ASSERT_EQ(info.status, 0) << info.err;
  const nlohmann::json doc = nlohmann::json::parse(info.out);
  EXPECT_EQ(doc.at("exports")[0].at("export-size"), raw_.size());
  EXPECT_EQ(doc.at("exports")[0].at("export-name"), kName);

  Outcome copied = run_program(dir_, "nbdcopy", {server.uri(), (dir_ / "copy").string()});
  ASSERT_EQ(copied.status, 0) << copied.err;
  EXPECT_TRUE(slurp(dir_ / "copy") == raw_);
  Outcome exported = run_lazyblock(dir_, {"export", "--store", store_, "--build", kBuild, "--name",
                                          kName, "-o", (dir_ / "exported").string()});
  ASSERT_EQ(exported.status, 0) << exported.err;
  EXPECT_TRUE(slurp(dir_ / "copy") == slurp(dir_ / "exported"));

  Outcome compared =
      run_program(dir_, "qemu-img",
                  {"compare", "-f", "raw", "-F", "raw", (dir_ / "raw").string(), server.uri()});
  EXPECT_EQ(compared.status, 0) << compared.out << compared.err;
  EXPECT_NE(compared.out.find("Images are identical"), std::string::npos) << compared.out;
  EXPECT_EQ(server.stop(), 0);
}

TEST_P(NbdTest, WritesGoToTheOverlayAndBecomeTheNextGeneration) {
  const std::string before = stored_objects();
  const std::filesystem::path overlay = dir_ / "overlay";
  std::string expected = raw_;
  {
    Server server(dir_, store_, {"--overlay", overlay.string()});
    ASSERT_TRUE(server.running());
    // Whole blocks, part of a block, across a block boundary, and zeroes.
    Outcome wrote =
        run_program(dir_, "qemu-io",
                    {"-f", "raw", "-c", "write -P 0xab 8192 8192", "-c", "write -P 0xcd 100 50",
                     "-c", "write -P 0xef 12000 9000", "-c", "write -z 1048576 65536", "-c",
                     "read -P 0xab 8192 3808", "-c", "read -P 0xcd 100 50", server.uri()});
    ASSERT_EQ(wrote.status, 0) << wrote.out << wrote.err;
    EXPECT_EQ(wrote.out.find("Pattern verification failed"), std::string::npos) << wrote.out;
    std::fill(expected.begin() + 8192, expected.begin() + 16384, '\xab');
    std::fill(expected.begin() + 100, expected.begin() + 150, '\xcd');
    std::fill(expected.begin() + 12000, expected.begin() + 21000, '\xef');
    std::fill(expected.begin() + 1048576, expected.begin() + 1048576 + 65536, '\0');
    // A new connection reads what the first wrote.
    Outcome reread = run_program(dir_, "qemu-io",
                                 {"-f", "raw", "-r", "-c", "read -P 0xef 12000 9000", "-c",
                                  "read -P 0 1048576 65536", server.uri()});
    ASSERT_EQ(reread.status, 0) << reread.out << reread.err;
    EXPECT_EQ(reread.out.find("Pattern verification failed"), std::string::npos) << reread.out;
    Outcome copied = run_program(dir_, "nbdcopy", {server.uri(), (dir_ / "written").string()});
    ASSERT_EQ(copied.status, 0) << copied.err;
    EXPECT_TRUE(slurp(dir_ / "written") == expected);
    EXPECT_EQ(server.stop(), 0);
  }
  EXPECT_TRUE(stored_objects() == before) << "the stored objects changed";

  Outcome packed = run_lazyblock(dir_, {"pack", "--store", store_, "--build", kChild, "--parent",
                                        kBuild, "--name", kName, "--overlay", overlay.string()});
  ASSERT_EQ(packed.status, 0) << packed.err;
  Outcome exported = run_lazyblock(dir_, {"export", "--store", store_, "--build", kChild, "--name",
                                          kName, "-o", (dir_ / "child").string()});
  ASSERT_EQ(exported.status, 0) << exported.err;
  EXPECT_TRUE(slurp(dir_ / "child") == expected);
  // Only the overlay's blocks were stored: a handful, not the disk.
  EXPECT_LT(std::filesystem::file_size(dir_ / "store" / kChild / kName), 64 * kKiB);
}

// A minimal NBD client speaking the protocol by hand, to send what real
// clients never do.
class RawClient {
 public:
  explicit RawClient(const std::filesystem::path& socket)
      : owner_(testing::connect_unix_socket(socket)), fd_(owner_.get()) {}
  bool connected() const { return fd_ >= 0; }
  // Whether the server has read everything sent so far (a Unix socket's
  // bytes count as queued until the receiver consumes them).
  bool all_consumed() const {
    int queued = -1;
    return ::ioctl(fd_, SIOCOUTQ, &queued) == 0 && queued == 0;
  }

  // The fixed-newstyle handshake with NBD_OPT_GO; simple replies.
  bool handshake(const std::string& name) {
    std::byte greeting[18];
    if (!read(greeting)) return false;
    put_u32(3);  // fixed newstyle, no zeroes
    put_u64(0x49484156454F5054).put_u32(7).put_u32(static_cast<uint32_t>(6 + name.size()));
    put_u32(static_cast<uint32_t>(name.size()));
    out_.insert(out_.end(), reinterpret_cast<const std::byte*>(name.data()),
                reinterpret_cast<const std::byte*>(name.data()) + name.size());
    put_u16(0);
    if (!flush()) return false;
    for (;;) {
      std::byte reply[20];
      if (!read(reply)) return false;
      const uint32_t type = u32(reply + 12);
      std::vector<std::byte> payload(u32(reply + 16));
      if (!read(payload)) return false;
      if (type == 1) return true;           // ACK: transmission
      if (type & 0x80000000) return false;  // an error
    }
  }

  // Sends a request; for a write, `data` follows.
  bool request(uint16_t type, uint64_t offset, uint32_t length,
               std::span<const std::byte> data = {}, uint16_t flags = 0) {
    put_u32(0x25609513)
        .put_u16(flags)
        .put_u16(type)
        .put_u64(++cookie_)
        .put_u64(offset)
        .put_u32(length);
    out_.insert(out_.end(), data.begin(), data.end());
    return flush();
  }
  // The error of the next simple reply, reading `data_length` bytes of data
  // if it succeeded; nullopt if the connection ended.
  std::optional<uint32_t> reply(size_t data_length = 0, std::vector<std::byte>* data = nullptr) {
    std::byte header[16];
    if (!read(header)) return std::nullopt;
    const uint32_t error = u32(header + 4);
    if (error == 0 && data_length > 0) {
      std::vector<std::byte> bytes(data_length);
      if (!read(bytes)) return std::nullopt;
      if (data != nullptr) *data = std::move(bytes);
    }
    return error;
  }
  bool send_raw(std::span<const std::byte> bytes) {
    out_.insert(out_.end(), bytes.begin(), bytes.end());
    return flush();
  }

 private:
  static uint32_t u32(const std::byte* at) {
    return static_cast<uint32_t>(at[0]) << 24 | static_cast<uint32_t>(at[1]) << 16 |
           static_cast<uint32_t>(at[2]) << 8 | static_cast<uint32_t>(at[3]);
  }
  RawClient& put_u16(uint16_t v) {
    out_.push_back(std::byte(v >> 8));
    out_.push_back(std::byte(v & 0xff));
    return *this;
  }
  RawClient& put_u32(uint32_t v) {
    return put_u16(static_cast<uint16_t>(v >> 16)).put_u16(static_cast<uint16_t>(v));
  }
  RawClient& put_u64(uint64_t v) {
    return put_u32(static_cast<uint32_t>(v >> 32)).put_u32(static_cast<uint32_t>(v));
  }
  bool flush() {
    const bool ok =
        ::send(fd_, out_.data(), out_.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(out_.size());
    out_.clear();
    return ok;
  }
  bool read(std::span<std::byte> buffer) {
    size_t done = 0;
    while (done < buffer.size()) {
      const ssize_t got = ::recv(fd_, buffer.data() + done, buffer.size() - done, 0);
      if (got <= 0) return false;
      done += static_cast<size_t>(got);
    }
    return true;
  }

  UniqueFd owner_;
  int fd_;
  uint64_t cookie_ = 0;
  std::vector<std::byte> out_;
};

constexpr uint32_t kEperm = 1, kEio = 5, kEinval = 22, kEnospc = 28, kEshutdown = 108;

TEST_P(NbdTest, BadRequestsGetTheirErrorsAndTheConnectionGoesOn) {
  Server server(dir_, store_, {});
  ASSERT_TRUE(server.running());
  RawClient client(server.socket());
  ASSERT_TRUE(client.connected());
  ASSERT_TRUE(client.handshake(kName));
  const uint64_t size = raw_.size();
  // A read past the end, one of 1 GiB, an unknown command, an unknown flag.
  ASSERT_TRUE(client.request(0, size - 10, 100));
  EXPECT_EQ(client.reply(), kEinval);
  ASSERT_TRUE(client.request(0, 0, 1u << 30));
  EXPECT_EQ(client.reply(), kEinval);
  ASSERT_TRUE(client.request(99, 0, 10));
  EXPECT_EQ(client.reply(), kEinval);
  ASSERT_TRUE(client.request(0, 0, 10, {}, 0x4000));
  EXPECT_EQ(client.reply(), kEinval);
  // A write past the end: ENOSPC, its payload read past.
  const std::vector<std::byte> payload(512, std::byte{0x11});
  ASSERT_TRUE(client.request(1, size - 100, 512, payload));
  EXPECT_EQ(client.reply(), kEnospc);
  // A write longer than 32 MiB is refused; its bytes are read past.
  ASSERT_TRUE(client.request(1, 0, 33 * kMiB, std::vector<std::byte>(33 * kMiB)));
  EXPECT_EQ(client.reply(), kEinval);
  // And the connection still serves good reads.
  std::vector<std::byte> data;
  ASSERT_TRUE(client.request(0, 4096 * 3, 4096));
  ASSERT_EQ(client.reply(4096, &data), 0u);
  EXPECT_EQ(std::memcmp(data.data(), raw_.data() + 4096 * 3, 4096), 0);
  EXPECT_EQ(server.stop(), 0);
}

TEST_P(NbdTest, AReadOnlyExportRefusesWrites) {
  Server server(dir_, store_, {"--read-only"});
  ASSERT_TRUE(server.running());
  RawClient client(server.socket());
  ASSERT_TRUE(client.handshake(kName));
  ASSERT_TRUE(client.request(1, 0, 4, std::vector<std::byte>(4)));
  EXPECT_EQ(client.reply(), kEperm);
  ASSERT_TRUE(client.request(4, 0, 4096));  // trim
  EXPECT_EQ(client.reply(), kEperm);
  ASSERT_TRUE(client.request(0, 0, 16));
  EXPECT_EQ(client.reply(16), 0u);
}

TEST_P(NbdTest, AClientThatVanishesLeavesTheServerServingOthers) {
  Server server(dir_, store_, {});
  ASSERT_TRUE(server.running());
  {
    RawClient vanishing(server.socket());
    ASSERT_TRUE(vanishing.handshake(kName));
    // A write header promising 4096 bytes, then 100 of them, then gone.
    ASSERT_TRUE(vanishing.request(1, 0, 4096, std::vector<std::byte>(100)));
  }
  {
    RawClient garbage(server.socket());
    ASSERT_TRUE(garbage.handshake(kName));
    ASSERT_TRUE(garbage.send_raw(std::vector<std::byte>(28, std::byte{0x42})));  // bad magic
    EXPECT_EQ(garbage.reply(), std::nullopt);                                    // closed
  }
  {
    RawClient unknown(server.socket());
    EXPECT_FALSE(unknown.handshake("no-such-export"));
  }
  RawClient other(server.socket());
  ASSERT_TRUE(other.handshake(""));  // the default export
  std::vector<std::byte> data;
  ASSERT_TRUE(other.request(0, 100, 1000));
  ASSERT_EQ(other.reply(1000, &data), 0u);
  EXPECT_EQ(std::memcmp(data.data(), raw_.data() + 100, 1000), 0);
  EXPECT_EQ(server.stop(), 0);
}

// SIGTERM while a read waits on a store that never answers: the read gets an
// error reply, the server exits 0 promptly (not after its 60 s fetch
// timeout), and what was written and flushed before is in the overlay.
TEST_P(NbdTest, SigtermCancelsFetchesInFlightAndKeepsTheOverlay) {
  const std::filesystem::path overlay = dir_ / "overlay";
  const std::vector<std::byte> written(8192, std::byte{0x5a});
  {
    // Streams deliver 64 KiB (the header is smaller), then stall.
    Server server(
        dir_, store_,
        {"--overlay", overlay.string(), "--timeout", "60s", "--faults", "stall-after=65536"});
    ASSERT_TRUE(server.running());
    RawClient client(server.socket());
    ASSERT_TRUE(client.handshake(kName));
    ASSERT_TRUE(client.request(1, 5 * kMiB, 8192, written));
    ASSERT_EQ(client.reply(), 0u);
    ASSERT_TRUE(client.request(3, 0, 0));  // flush
    ASSERT_EQ(client.reply(), 0u);
    // 1 MiB that no stream can bring.
    ASSERT_TRUE(client.request(0, kMiB, static_cast<uint32_t>(kMiB)));
    while (!client.all_consumed()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));  // polling a real condition
    }
    const auto signalled = std::chrono::steady_clock::now();
    ASSERT_EQ(::kill(server.pid(), SIGTERM), 0);
    const std::optional<uint32_t> error = client.reply();
    // A hang guard, not a timing assertion: the fetch timeout is 60 s.
    while (server.running() &&
           std::chrono::steady_clock::now() - signalled < std::chrono::seconds(10)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a real condition
    }
    const bool exited = !server.running();
    if (!exited) server.kill_hard();
    ASSERT_TRUE(exited) << "still running 10 s after SIGTERM: " << slurp(dir_ / "server.log");
    std::printf(
        "serve nbd exited %.3f s after SIGTERM\n",
        std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled).count());
    EXPECT_EQ(server.stop(), 0) << slurp(dir_ / "server.log");
    ASSERT_TRUE(error.has_value()) << "the read got no reply";
    EXPECT_TRUE(*error == kEshutdown || *error == kEio) << *error;
  }
  Server server(dir_, store_, {"--overlay", overlay.string()});
  ASSERT_TRUE(server.running());
  RawClient client(server.socket());
  ASSERT_TRUE(client.handshake(kName));
  std::vector<std::byte> data;
  ASSERT_TRUE(client.request(0, 5 * kMiB - 4096, 4096 * 4));
  ASSERT_EQ(client.reply(4096 * 4, &data), 0u);
  EXPECT_EQ(std::memcmp(data.data(), raw_.data() + 5 * kMiB - 4096, 4096), 0);
  EXPECT_TRUE(std::equal(data.begin() + 4096, data.begin() + 4096 * 3, written.begin()));
  EXPECT_EQ(std::memcmp(data.data() + 4096 * 3, raw_.data() + 5 * kMiB + 8192, 4096), 0);
  ASSERT_TRUE(client.request(0, kMiB, static_cast<uint32_t>(kMiB)));
  ASSERT_EQ(client.reply(kMiB, &data), 0u);
  EXPECT_EQ(std::memcmp(data.data(), raw_.data() + kMiB, kMiB), 0);
  EXPECT_EQ(server.stop(), 0);
}

// The block cache's file cut short under the running server (as a failing
// disk would make its map fault): the reads past the cut get an EIO at most,
// then the right bytes; the server serves on.
TEST_P(NbdTest, ACacheFileCutShortUnderTheServerCostsOneReadAtMost) {
  Server server(dir_, store_, {"--read-only"});
  ASSERT_TRUE(server.running());
  Outcome copied = run_program(dir_, "nbdcopy", {server.uri(), (dir_ / "copy").string()});
  ASSERT_EQ(copied.status, 0) << copied.err;
  ASSERT_TRUE(slurp(dir_ / "copy") == raw_);
  // One data file (the build has no parent), no overlay: one cache file.
  const std::vector<std::filesystem::path> caches = testing::unnamed_files_of(server.pid());
  ASSERT_EQ(caches.size(), 1u);
  const std::filesystem::path& cache = caches[0];
  {
    const UniqueFd file(::open(cache.c_str(), O_WRONLY));
    const int fd = file.get();
    ASSERT_GE(fd, 0) << std::strerror(errno);
    ASSERT_EQ(::ftruncate(fd, static_cast<off_t>(kMiB)), 0) << std::strerror(errno);
  }
  RawClient client(server.socket());
  ASSERT_TRUE(client.handshake(kName));
  std::vector<std::byte> data;
  const uint32_t length = 256 * 1024;
  ASSERT_TRUE(client.request(0, 3 * kMiB, length));
  std::optional<uint32_t> error = client.reply(length, &data);
  ASSERT_TRUE(error.has_value()) << "no reply: " << slurp(dir_ / "server.log");
  if (*error != 0) {
    EXPECT_EQ(*error, kEio);
    ASSERT_TRUE(client.request(0, 3 * kMiB, length));
    ASSERT_EQ(client.reply(length, &data), 0u);
  }
  EXPECT_EQ(std::memcmp(data.data(), raw_.data() + 3 * kMiB, length), 0);
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  // Either chunker warns as it fetches the lost bytes again.
  EXPECT_NE(slurp(dir_ / "server.log").find("could not be read"), std::string::npos)
      << "the cut was not met: " << slurp(dir_ / "server.log");
  Outcome again = run_program(dir_, "nbdcopy", {server.uri(), (dir_ / "again").string()});
  ASSERT_EQ(again.status, 0) << again.err << slurp(dir_ / "server.log");
  EXPECT_TRUE(slurp(dir_ / "again") == raw_);
  EXPECT_EQ(server.stop(), 0);
}

// Resident memory of process `pid`, in bytes.
uint64_t resident_bytes(pid_t pid) {
  std::ifstream status("/proc/" + std::to_string(pid) + "/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("VmRSS:", 0) == 0) return std::stoull(line.substr(6)) * 1024;
  }
  return 0;
}

// Clients that pipeline large reads and never read the replies: the server
// holds a bounded amount of reply memory (256 MiB in all), not one buffer
// per request, and serves another client meanwhile.
TEST_P(NbdTest, ClientsThatDoNotReadRepliesHoldBoundedMemory) {
  // A 40 MiB disk: 1 MiB of data, then zeros (served without a fetch).
  std::string disk(40 * kMiB, '\0');
  std::copy(raw_.begin(), raw_.begin() + kMiB, disk.begin());
  Result<testing::PackedBuild> packed =
      testing::pack_build(build_spec(dir_ / "big"), std::as_bytes(std::span(disk)));
  ASSERT_TRUE(packed) << packed.status().to_string();
  Server server(dir_, packed->store_url, {"--read-only"});
  ASSERT_TRUE(server.running());
  const uint64_t before = resident_bytes(server.pid());
  std::vector<std::unique_ptr<RawClient>> greedy;
  for (int i = 0; i < 8; ++i) {
    greedy.push_back(std::make_unique<RawClient>(server.socket()));
    ASSERT_TRUE(greedy.back()->handshake(kName));
    for (int r = 0; r < 50; ++r) ASSERT_TRUE(greedy.back()->request(0, 0, 32 * kMiB));
  }
  uint64_t peak = 0;
  std::atomic<bool> copying{true};
  std::thread watch([&] {
    while (copying.load()) {
      peak = std::max(peak, resident_bytes(server.pid()));
      std::this_thread::sleep_for(std::chrono::milliseconds(10));  // sampling, not waiting
    }
  });
  // A hang guard: on a server whose workers are all stuck on the greedy
  // clients, the copy never ends.
  Outcome copied =
      run_program(dir_, "timeout", {"60", "nbdcopy", server.uri(), (dir_ / "copy").string()});
  copying.store(false);
  watch.join();
  peak = std::max(peak, resident_bytes(server.pid()));
  EXPECT_EQ(copied.status, 0) << copied.err;
  EXPECT_TRUE(slurp(dir_ / "copy") == disk);
  std::printf("serve nbd resident: %.0f MiB before, at most %.0f MiB with 8 greedy clients\n",
              static_cast<double>(before) / kMiB, static_cast<double>(peak) / kMiB);
#if !defined(__SANITIZE_THREAD__)
  // (TSan's shadow memory multiplies what is resident: there only the
  // service of the other client is checked.)
  EXPECT_LT(peak, before + 256 * kMiB + 100 * kMiB);
#endif
  ASSERT_TRUE(server.running());
  greedy.clear();
  EXPECT_EQ(server.stop(), 0);
}

// [begin, end) ranges, sorted and merged.
using Ranges = std::vector<std::pair<uint64_t, uint64_t>>;

Ranges merged(Ranges ranges) {
  std::sort(ranges.begin(), ranges.end());
  Ranges out;
  for (const auto& [begin, end] : ranges) {
    if (!out.empty() && begin <= out.back().second) {
      out.back().second = std::max(out.back().second, end);
    } else {
      out.emplace_back(begin, end);
    }
  }
  return out;
}

Ranges without(const Ranges& ranges, uint64_t begin, uint64_t end) {
  Ranges out;
  for (const auto& [b, e] : ranges) {
    if (e <= begin || b >= end) {
      out.emplace_back(b, e);
      continue;
    }
    if (b < begin) out.emplace_back(b, begin);
    if (e > end) out.emplace_back(end, e);
  }
  return out;
}

TEST_P(NbdTest, BlockStatusShowsZeroMappingsAndTrimmedBlocksAsHoles) {
  // The zero ranges as the header has them.
  Outcome inspected = run_lazyblock(
      dir_, {"inspect", "--store", store_, "--build", kBuild, "--name", kName, "--json"});
  ASSERT_EQ(inspected.status, 0) << inspected.err;
  const nlohmann::json header = nlohmann::json::parse(inspected.out);
  Ranges holes;
  for (const nlohmann::json& m : header.at("mappings")) {
    if (m.at("build_id").get<std::string>() != "00000000-0000-0000-0000-000000000000") continue;
    const uint64_t offset = m.at("offset");
    const uint64_t length = m.at("length");
    holes.emplace_back(offset, std::min<uint64_t>(offset + length, raw_.size()));
  }
  holes = merged(holes);
  ASSERT_GT(holes.size(), 100u);  // every fifth block of the test's disk

  // What a client sees: base:allocation's holes, as nbdinfo and qemu-img map them.
  const auto nbdinfo_holes = [&](const std::string& uri) {
    Outcome map = run_program(dir_, "nbdinfo", {"--map", "--json", uri});
    EXPECT_EQ(map.status, 0) << map.err;
    Ranges seen;
    uint64_t covered = 0;
    for (const nlohmann::json& e : nlohmann::json::parse(map.out)) {
      const uint64_t offset = e.at("offset");
      const uint64_t length = e.at("length");
      EXPECT_EQ(offset, covered);
      covered = offset + length;
      const uint32_t type = e.at("type");
      if (type != 0) {
        EXPECT_EQ(type, 3u) << "a hole reads as zeros";
        seen.emplace_back(offset, offset + length);
      }
    }
    EXPECT_EQ(covered, raw_.size());
    return merged(seen);
  };
  const auto qemu_holes = [&](const std::string& uri) {
    Outcome map = run_program(dir_, "qemu-img", {"map", "--output=json", "-f", "raw", uri});
    EXPECT_EQ(map.status, 0) << map.err;
    Ranges seen;
    for (const nlohmann::json& e : nlohmann::json::parse(map.out)) {
      if (e.at("zero").get<bool>() && !e.at("data").get<bool>()) {
        const uint64_t start = e.at("start");
        const uint64_t length = e.at("length");
        seen.emplace_back(start, start + length);
      }
    }
    return merged(seen);
  };

  Server server(dir_, store_, {});
  ASSERT_TRUE(server.running());
  EXPECT_EQ(nbdinfo_holes(server.uri()), holes);
  EXPECT_EQ(qemu_holes(server.uri()), holes);

  // Through the overlay: a trimmed data range and one written with zeroes
  // become holes; data written over a zero block is data.
  Outcome changed =
      run_program(dir_, "qemu-io",
                  {"-f", "raw", "-c", "discard 1048576 65536", "-c", "write -z -u 3145728 16384",
                   "-c", "write -P 0x55 8192 4096", server.uri()});
  ASSERT_EQ(changed.status, 0) << changed.out << changed.err;
  holes.emplace_back(1048576, 1048576 + 65536);
  holes.emplace_back(3145728, 3145728 + 16384);
  holes = without(merged(holes), 8192, 8192 + 4096);
  EXPECT_EQ(nbdinfo_holes(server.uri()), holes);
  EXPECT_EQ(qemu_holes(server.uri()), holes);
  // And they read as they are reported.
  Outcome reread = run_program(dir_, "qemu-io",
                               {"-f", "raw", "-r", "-c", "read -P 0 1048576 65536", "-c",
                                "read -P 0x55 8192 4096", server.uri()});
  ASSERT_EQ(reread.status, 0) << reread.out << reread.err;
  EXPECT_EQ(reread.out.find("Pattern verification failed"), std::string::npos) << reread.out;
  EXPECT_EQ(server.stop(), 0);
}

}  // namespace
}  // namespace lazyblock
