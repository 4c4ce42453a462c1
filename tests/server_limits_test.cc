// `lazyblock serve nbd` and `serve uffd` under clients that take what they
// can: hundreds of connections that never say a word, in a process limited
// to 256 descriptors (as `ulimit -n 256` would). The servers must stay up,
// close the silent ones once their handshake time is out, and serve a real
// client (nbdcopy; a Firecracker-like restore) meanwhile and after.
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "common/units.h"
#include "testing/build_fixture.h"
#include "testing/firecracker_stand_in.h"
#include "testing/local_port.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

using testing::FirecrackerStandIn;

const std::string kBuild = "3d3d3d3d-1111-4222-8333-444455556666";
constexpr uint64_t kOpenFiles = 256;  // the servers' RLIMIT_NOFILE
constexpr int kSilentDuring = 20;     // silent clients while a real one is served
constexpr int kSilent = 300;          // silent clients in all
constexpr uint64_t kMemfileSize = 4 * kMiB;

// The descriptors process `pid` holds now.
size_t descriptors_of(pid_t pid) {
  size_t count = 0;
  std::error_code error;
  for (auto it = std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", error);
       !error && it != std::filesystem::directory_iterator(); it.increment(error)) {
    ++count;
  }
  return count;
}

// Connections that connect and say nothing.
class SilentClients {
 public:
  // Connects `count` more; false if a connect failed.
  bool connect(const std::filesystem::path& socket, int count) {
    for (int i = 0; i < count; ++i) {
      UniqueFd fd = testing::connect_unix_socket(socket);
      if (!fd) return false;
      fds_.push_back(fd.get());
      owners_.push_back(std::move(fd));
    }
    return true;
  }
  // Waits (up to `guard`, a hang guard) until the server has closed every
  // one of them: reads what it sent (an NBD greeting) up to the end.
  // Returns how many it closed.
  size_t wait_closed(std::chrono::seconds guard) {
    const auto until = std::chrono::steady_clock::now() + guard;
    std::vector<bool> closed(fds_.size(), false);
    size_t count = 0;
    while (count < fds_.size() && std::chrono::steady_clock::now() < until) {
      std::vector<pollfd> fds;
      std::vector<size_t> which;
      for (size_t i = 0; i < fds_.size(); ++i) {
        if (closed[i]) continue;
        fds.push_back({fds_[i], POLLIN, 0});
        which.push_back(i);
      }
      if (::poll(fds.data(), fds.size(), 100) <= 0) continue;
      for (size_t k = 0; k < fds.size(); ++k) {
        if (fds[k].revents == 0) continue;
        char buffer[256];
        const ssize_t got = ::recv(fds[k].fd, buffer, sizeof buffer, MSG_DONTWAIT);
        if (got == 0 || (got < 0 && errno != EAGAIN && errno != EINTR)) {
          closed[which[k]] = true;
          ++count;
        }
      }
    }
    return count;
  }
  size_t size() const { return fds_.size(); }

 private:
  std::vector<UniqueFd> owners_;
  std::vector<int> fds_;  // owners_' descriptors, for poll
};

class ServerLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    std::mt19937_64 rng(5);
    disk_.assign(5 * kMiB + 4096, '\0');
    for (char& c : disk_) c = static_cast<char>(rng());
    memfile_ = testing::make_pattern(3, 0, kMemfileSize);
    const std::pair<const char*, std::span<const std::byte>> images[] = {
        {"disk", std::as_bytes(std::span(disk_))}, {"memfile", memfile_}};
    for (const auto& [name, bytes] : images) {
      Result<testing::PackedBuild> packed =
          testing::pack_build({dir_ / "store", kBuild, name}, bytes);
      ASSERT_TRUE(packed) << packed.status().to_string();
      store_ = packed->store_url;
    }
  }

  ServerProcess serve(const std::string& kind, const std::string& name,
                      std::vector<std::string> extra) {
    std::vector<std::string> args = {"serve",
                                     kind,
                                     "--store",
                                     store_,
                                     "--build",
                                     kBuild,
                                     "--name",
                                     name,
                                     "--socket",
                                     socket().string(),
                                     "--handshake-timeout",
                                     "5s",
                                     "--log-level",
                                     "info"};
    args.insert(args.end(), extra.begin(), extra.end());
    return ServerProcess(dir_, args, socket(), kOpenFiles);
  }
  std::filesystem::path socket() const { return dir_ / "server.sock"; }

  // nbdcopy of the whole disk, byte-exact.
  void copy_disk_exactly(const std::string& copy) {
    const std::string uri = "nbd+unix:///disk?socket=" + socket().string();
    Outcome copied = run_program(dir_, "nbdcopy", {uri, (dir_ / copy).string()});
    ASSERT_EQ(copied.status, 0) << copied.err << slurp(dir_ / "server.log");
    EXPECT_TRUE(slurp(dir_ / copy) == disk_) << "the copy differs";
  }

  // A VM restored over the handler, every page of its memory checked.
  void restore_exactly() {
    Result<std::unique_ptr<FirecrackerStandIn>> vm =
        FirecrackerStandIn::restore(socket(), {{kMemfileSize, 0, false}});
    ASSERT_TRUE(vm) << vm.status().to_string();
    size_t wrong = 0;
    for (uint64_t offset = 0; offset < kMemfileSize; offset += 4096) {
      if (std::memcmp((*vm)->memory(0) + offset, memfile_.data() + offset, 4096) != 0) ++wrong;
    }
    EXPECT_EQ(wrong, 0u) << "pages wrong of " << kMemfileSize / 4096;
  }

  // Silent clients while `serve_one` serves a real one, then many more (past
  // the connection limit, or past the descriptor limit): the server stays up,
  // closes them all once their handshake time is out, and serves again.
  void survive_silent_clients(ServerProcess& server, const std::function<void()>& serve_one) {
    ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
    SilentClients silent;
    ASSERT_TRUE(silent.connect(socket(), kSilentDuring));
    ASSERT_NO_FATAL_FAILURE(serve_one());
    ASSERT_TRUE(silent.connect(socket(), kSilent - kSilentDuring));
    const size_t held = descriptors_of(server.pid());
    ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
    // A hang guard, not a timing assertion: the handshake timeout is 5 s
    // (long enough for all of them to be open at once, even under TSan).
    EXPECT_EQ(silent.wait_closed(std::chrono::seconds(30)), silent.size());
    ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
    std::printf("server descriptors: %zu with %d silent clients, %zu once they were closed\n", held,
                kSilent, descriptors_of(server.pid()));
    ASSERT_NO_FATAL_FAILURE(serve_one());
    EXPECT_EQ(server.stop(), 0) << slurp(dir_ / "server.log");
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::string store_;
  std::string disk_;
  std::vector<std::byte> memfile_;
};

// The default connection limit (from RLIMIT_NOFILE) refuses what is past it.
TEST_F(ServerLimitsTest, NbdRefusesConnectionsPastItsLimitAndClosesSilentOnes) {
  ServerProcess server = serve("nbd", "disk", {});
  survive_silent_clients(server, [&] { copy_disk_exactly("copy"); });
  EXPECT_NE(slurp(dir_ / "server.log").find("refused a connection"), std::string::npos);
}

// A limit above the descriptors the process may have: accept meets EMFILE.
TEST_F(ServerLimitsTest, NbdOutOfDescriptorsKeepsAccepting) {
  ServerProcess server = serve("nbd", "disk", {"--max-connections", "100000"});
  survive_silent_clients(server, [&] { copy_disk_exactly("copy"); });
  EXPECT_NE(slurp(dir_ / "server.log").find("out of file descriptors"), std::string::npos)
      << slurp(dir_ / "server.log");
}

TEST_F(ServerLimitsTest, UffdRefusesConnectionsPastItsLimitAndClosesSilentOnes) {
  ServerProcess server = serve("uffd", "memfile", {"--no-prefetch"});
  survive_silent_clients(server, [&] { restore_exactly(); });
  EXPECT_NE(slurp(dir_ / "server.log").find("refused a connection"), std::string::npos);
}

TEST_F(ServerLimitsTest, UffdOutOfDescriptorsKeepsAccepting) {
  ServerProcess server = serve("uffd", "memfile", {"--no-prefetch", "--max-connections", "100000"});
  survive_silent_clients(server, [&] { restore_exactly(); });
  EXPECT_NE(slurp(dir_ / "server.log").find("out of file descriptors"), std::string::npos)
      << slurp(dir_ / "server.log");
}

}  // namespace
}  // namespace lazyblock
