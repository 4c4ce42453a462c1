// `lazyblock serve uffd` as Firecracker meets it: a stand-in VM in this
// process maps guest memory, registers it with a real userfaultfd and hands
// it to the handler process over its socket; touching the memory then
// faults every page in through the handler, from a packed memfile with zero
// ranges in a file store.
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <mutex>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "common/units.h"
#include "image/device.h"
#include "image/frame_table.h"
#include "serve/uffd/uffd_server.h"
#include "storage/fault_store.h"
#include "storage/file_store.h"
#include "testing/build_fixture.h"
#include "testing/firecracker_stand_in.h"
#include "testing/local_port.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "testing/unnamed_files.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

using testing::FirecrackerStandIn;
using testing::StandInRegion;

const std::string kBuild = "5c5c5c5c-1111-4222-8333-444455556666";
constexpr uint64_t kPage = 4096;
constexpr uint64_t kHugePage = 2 * kMiB;
constexpr uint64_t kMemfileSize = 12 * kMiB;

// Frames of a compressed build: small, so that a 2 MiB huge page or a 4 MiB
// chunk spans several.
constexpr uint64_t kFrameSize = 256 * kKiB;

// The memfile that `lazyblock serve uffd` serves, packed with the suite's
// parameter as its data file's codec: every test runs over a plain and a
// compressed build.
class UffdTest : public ::testing::TestWithParam<image::Codec> {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    // Pattern bytes with zero pages: every 7th page, and all of [3 MiB, 4 MiB),
    // which the header maps to nil; and text pages (which a codec compresses,
    // each page naming itself).
    memfile_ = testing::make_pattern(11, 0, kMemfileSize);
    for (uint64_t page = 0; page < kMemfileSize / kPage; ++page) {
      const uint64_t offset = page * kPage;
      if (page % 7 == 3 || (offset >= 3 * kMiB && offset < 4 * kMiB)) {
        std::memset(memfile_.data() + offset, 0, kPage);
      } else if (page % 7 == 5) {
        const std::string text = "page " + std::to_string(page) + " of the guest's memory\n";
        for (uint64_t i = 0; i < kPage; ++i) {
          memfile_[offset + i] = static_cast<std::byte>(text[i % text.size()]);
        }
      }
    }
    testing::BuildSpec spec(dir_ / "store", kBuild, "memfile");
    spec.codec = GetParam();
    spec.frame_size = kFrameSize;
    Result<testing::PackedBuild> packed = testing::pack_build(spec, memfile_);
    ASSERT_TRUE(packed) << packed.status().to_string();
    store_ = packed->store_url;
    data_key_ = packed->data_key;
    // The suite's codec took: the data file is the one a compressed build has.
    ASSERT_EQ(data_key_, kBuild + "/memfile" + std::string(image::data_file_suffix(GetParam())));
  }

  // A page of the memfile as it must appear in guest memory.
  std::span<const std::byte> expected(uint64_t offset, uint64_t length) const {
    return std::span(memfile_).subspan(offset, length);
  }

  ServerProcess serve(std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"serve",       "uffd", "--store",  store_,
                                     "--build",     kBuild, "--socket", socket().string(),
                                     "--log-level", "info"};
    args.insert(args.end(), extra.begin(), extra.end());
    return ServerProcess(dir_, args, socket());
  }
  std::filesystem::path socket() const { return dir_ / "uffd.sock"; }

  // The packed memfile read in this process, through a store the test may
  // break at any time (faults_), its data file's size already learned.
  void open_breakable_memfile() {
    Result<std::shared_ptr<FileStore>> files = FileStore::open(dir_ / "store");
    ASSERT_TRUE(files);
    faults_ = std::make_shared<FaultStore>(*files);
    ChunkerOptions options;
    options.cache_dir = dir_;
    Result<std::unique_ptr<image::Device>> memfile =
        image::Device::open(std::make_shared<image::DataFiles>(faults_, options),
                            *image::Uuid::parse(kBuild), "memfile");
    ASSERT_TRUE(memfile) << memfile.status().to_string();
    ASSERT_TRUE((*memfile)->learn_sizes().is_ok());
    device_ = std::move(memfile).value();
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::string store_;
  std::string data_key_;  // the memfile's data file: BUILD/memfile, or with .lz4
  std::vector<std::byte> memfile_;
  std::shared_ptr<FaultStore> faults_;     // by open_breakable_memfile
  std::unique_ptr<image::Device> device_;  // by open_breakable_memfile
};

// Named as the codecs are on the command line: none, zstd, lz4.
INSTANTIATE_TEST_SUITE_P(Codec, UffdTest,
                         ::testing::Values(image::Codec::kNone, image::Codec::kLz4),
                         [](const ::testing::TestParamInfo<image::Codec>& info) {
                           return std::string(image::codec_name(info.param));
                         });

// Reads every page of `memory` (mapping memfile bytes from `offset`) in a
// shuffled order from `threads` threads, as vCPUs would, and returns the
// offsets of the pages that came out wrong.
std::vector<uint64_t> touch_all(std::byte* memory, uint64_t size, uint64_t page,
                                const std::function<std::span<const std::byte>(uint64_t)>& want,
                                int threads, uint64_t seed) {
  std::vector<uint64_t> pages;
  for (uint64_t offset = 0; offset < size; offset += page) pages.push_back(offset);
  std::shuffle(pages.begin(), pages.end(), std::mt19937_64(seed));
  std::mutex mu;
  std::vector<uint64_t> wrong;
  std::vector<std::thread> vcpus;
  for (int t = 0; t < threads; ++t) {
    vcpus.emplace_back([&, t] {
      for (size_t i = static_cast<size_t>(t); i < pages.size(); i += static_cast<size_t>(threads)) {
        const uint64_t offset = pages[i];
        if (std::memcmp(memory + offset, want(offset).data(), page) != 0) {
          std::lock_guard lock(mu);
          wrong.push_back(offset);
        }
      }
    });
  }
  for (std::thread& vcpu : vcpus) vcpu.join();
  return wrong;
}

// Whether every page of [memory, memory + size) is resident (installed).
bool resident(const std::byte* memory, uint64_t size) {
  std::vector<unsigned char> pages(size / kPage);
  if (::mincore(const_cast<std::byte*>(memory), size, pages.data()) != 0) return false;
  return std::all_of(pages.begin(), pages.end(), [](unsigned char p) { return (p & 1) != 0; });
}

TEST_P(UffdTest, ServesEveryPageByteExactToSeveralVcpus) {
  ServerProcess server = serve();
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  // Two regions, mapped at memfile offsets 0 and 8 MiB, as Firecracker
  // splits guest memory around the MMIO gap.
  Result<std::unique_ptr<FirecrackerStandIn>> vm =
      FirecrackerStandIn::restore(socket(), {{6 * kMiB, 0, false}, {4 * kMiB, 8 * kMiB, false}});
  ASSERT_TRUE(vm) << vm.status().to_string();
  for (size_t region = 0; region < 2; ++region) {
    const uint64_t base = region == 0 ? 0 : 8 * kMiB;
    const std::vector<uint64_t> wrong =
        touch_all((*vm)->memory(region), (*vm)->size(region), kPage,
                  [&](uint64_t offset) { return expected(base + offset, kPage); }, 4, region);
    EXPECT_TRUE(wrong.empty()) << wrong.size() << " wrong pages in region " << region
                               << ", the first at " << wrong.front();
  }
  vm->reset();  // the VM exits; the handler goes on serving
  EXPECT_EQ(server.stop(), 0) << slurp(dir_ / "server.log");
  const std::string log = slurp(dir_ / "server.log");
  EXPECT_NE(log.find("VM ended"), std::string::npos) << log;
}

TEST_P(UffdTest, HugePageRegionsAreServedWhole) {
  if (!testing::reserve_huge_pages(4)) GTEST_SKIP() << "no 2 MiB huge pages on this machine";
  ServerProcess server = serve();
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  // 4 MiB at memfile offset 2 MiB: one huge page of data (with zero pages
  // inside), one that straddles the nil range [3 MiB, 4 MiB) and data.
  Result<std::unique_ptr<FirecrackerStandIn>> vm =
      FirecrackerStandIn::restore(socket(), {{4 * kMiB, 2 * kMiB, true}});
  ASSERT_TRUE(vm) << vm.status().to_string();
  const std::vector<uint64_t> wrong =
      touch_all((*vm)->memory(0), (*vm)->size(0), kHugePage,
                [&](uint64_t offset) { return expected(2 * kMiB + offset, kHugePage); }, 2, 7);
  EXPECT_TRUE(wrong.empty()) << "huge page at " << wrong.front() << " is wrong";
}

TEST_P(UffdTest, RemovedRangesReadAsZerosAndDoNotWedgeTheHandler) {
  ServerProcess server = serve();
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  // The REMOVE races a vCPU's faults differently each time: several VMs.
  for (int round = 0; round < 4; ++round) {
    Result<std::unique_ptr<FirecrackerStandIn>> vm =
        FirecrackerStandIn::restore(socket(), {{8 * kMiB, 0, false}});
    ASSERT_TRUE(vm) << vm.status().to_string();
    std::byte* memory = (*vm)->memory(0);
    // Touch the first 2 MiB, then the balloon takes [1 MiB, 3 MiB) back
    // while a vCPU goes on faulting pages elsewhere.
    EXPECT_EQ(std::memcmp(memory, expected(0, 2 * kMiB).data(), 2 * kMiB), 0);
    std::vector<uint64_t> wrong;
    std::thread vcpu([&] {
      for (uint64_t offset = 4 * kMiB; offset < 8 * kMiB; offset += kPage) {
        if (std::memcmp(memory + offset, expected(offset, kPage).data(), kPage) != 0) {
          wrong.push_back(offset);
        }
      }
    });
    ASSERT_TRUE((*vm)->remove(0, 1 * kMiB, 2 * kMiB).is_ok());
    vcpu.join();
    EXPECT_TRUE(wrong.empty()) << wrong.size() << " wrong pages, the first at " << wrong.front();
    // The removed range is the guest's fresh memory: zeros, touched or not
    // before; the rest is still the snapshot's.
    const std::vector<std::byte> zero(kPage);
    for (uint64_t offset = 1 * kMiB; offset < 3 * kMiB; offset += kPage) {
      ASSERT_EQ(std::memcmp(memory + offset, zero.data(), kPage), 0) << "at " << offset;
    }
    EXPECT_EQ(std::memcmp(memory, expected(0, 1 * kMiB).data(), 1 * kMiB), 0);
    EXPECT_EQ(std::memcmp(memory + 3 * kMiB, expected(3 * kMiB, 1 * kMiB).data(), 1 * kMiB), 0);
  }
  EXPECT_EQ(server.stop(), 0);
}

TEST_P(UffdTest, AFaultWhoseFetchFailsWaitsAndGetsTheRightBytes) {
  // In process, to break the store only once serving has begun: its first
  // reads fail, with no retry layer to hide it. The handler must neither
  // give the vCPU wrong bytes nor give up on it.
  ASSERT_NO_FATAL_FAILURE(open_breakable_memfile());
  uffd::UffdServer server(*device_, {});
  ASSERT_TRUE(server.listen_unix(socket()).is_ok());
  std::thread serving([&] { EXPECT_TRUE(server.serve().is_ok()); });

  faults_->set(*FaultSpec::parse("fail-open,times=2"));
  Result<std::unique_ptr<FirecrackerStandIn>> vm =
      FirecrackerStandIn::restore(socket(), {{1 * kMiB, 5 * kMiB, false}});
  ASSERT_TRUE(vm) << vm.status().to_string();
  EXPECT_EQ(std::memcmp((*vm)->memory(0), expected(5 * kMiB, 1 * kMiB).data(), 1 * kMiB), 0);
  vm->reset();
  server.stop();
  serving.join();
  const uffd::UffdStats stats = server.stats();
  EXPECT_EQ(stats.served_fetched + stats.served_cached + stats.served_zero, stats.faults);
  EXPECT_GE(stats.faults, 1u);
}

TEST_P(UffdTest, AVmWhosePagesCannotBeFetchedDoesNotHoldUpAnother) {
  // The data file ends early (its reported size unchanged): every page
  // past its first 4 MiB fails to fetch, for good.
  ASSERT_NO_FATAL_FAILURE(open_breakable_memfile());
  faults_->set(*FaultSpec::parse("short=" + std::to_string(4 * kMiB)));
  uffd::UffdOptions uffd_options;
  uffd_options.workers = 2;  // fewer than the broken VM's stuck faults
  uffd::UffdServer server(*device_, uffd_options);
  ASSERT_TRUE(server.listen_unix(socket()).is_ok());
  std::thread serving([&] { EXPECT_TRUE(server.serve().is_ok()); });

  // Four vCPUs of one VM fault on pages that cannot be had...
  Result<std::unique_ptr<FirecrackerStandIn>> broken =
      FirecrackerStandIn::restore(socket(), {{4 * kMiB, 8 * kMiB, false}});
  ASSERT_TRUE(broken) << broken.status().to_string();
  std::vector<std::thread> stuck;
  for (int vcpu = 0; vcpu < 4; ++vcpu) {
    const std::byte* page = (*broken)->memory(0) + (2 * vcpu + 1) * kPage;  // none a zero page
    stuck.emplace_back([page] { (void)*reinterpret_cast<const volatile std::byte*>(page); });
  }
  // ...while another VM of the same host gets its pages.
  Result<std::unique_ptr<FirecrackerStandIn>> healthy =
      FirecrackerStandIn::restore(socket(), {{1 * kMiB, 0, false}});
  ASSERT_TRUE(healthy) << healthy.status().to_string();
  EXPECT_EQ(std::memcmp((*healthy)->memory(0), expected(0, 1 * kMiB).data(), 1 * kMiB), 0);

  // The broken VM's faults are still waiting: ending both sides of its
  // descriptor lets them go (as zero pages, the VM being gone).
  healthy->reset();
  server.stop();
  serving.join();
  (*broken)->close_userfaultfd();
  for (std::thread& vcpu : stuck) vcpu.join();
}

// Sends `body` as Firecracker would, with a descriptor if `fd` >= 0, and
// closes the connection.
void send_handshake(const std::filesystem::path& socket, const std::string& body, int fd) {
  const UniqueFd owner = testing::connect_unix_socket(socket);
  const int connection = owner.get();
  ASSERT_GE(connection, 0);
  EXPECT_TRUE(testing::send_with_descriptor(connection, body, fd).is_ok());
}

// A userfaultfd as Firecracker creates it, registered on nothing.
UniqueFd new_userfaultfd() {
  UniqueFd fd(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_EVENT_REMOVE;
  if (fd && ::ioctl(fd.get(), UFFDIO_API, &api) != 0) fd.reset();
  return fd;
}

TEST_P(UffdTest, BadHandshakesEndOnlyTheirConnection) {
  ServerProcess server = serve();
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  // A VM being served while the bad ones come and go.
  Result<std::unique_ptr<FirecrackerStandIn>> served =
      FirecrackerStandIn::restore(socket(), {{1 * kMiB, 0, false}});
  ASSERT_TRUE(served) << served.status().to_string();
  UniqueFd uffd_owner = new_userfaultfd();
  const int uffd = uffd_owner.get();
  ASSERT_GE(uffd, 0);
  const std::string good =
      "[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0,"
      "\"page_size\":4096}]";
  send_handshake(socket(), good, -1);
  send_handshake(socket(), "[{\"base_host_virt_addr\": 4096, \"size\":", -1);
  send_handshake(socket(), good, STDIN_FILENO);
  send_handshake(socket(), "{not json", uffd);
  send_handshake(socket(),
                 "[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":" +
                     std::to_string(kMemfileSize) + ",\"page_size\":4096}]",
                 uffd);
  send_handshake(socket(),
                 "[{\"base_host_virt_addr\":4096,\"size\":4096,\"offset\":0,"
                 "\"page_size\":8192}]",
                 uffd);
  uffd_owner.reset();

  EXPECT_EQ(std::memcmp((*served)->memory(0), expected(0, 1 * kMiB).data(), 1 * kMiB), 0);
  Result<std::unique_ptr<FirecrackerStandIn>> vm =
      FirecrackerStandIn::restore(socket(), {{2 * kMiB, 6 * kMiB, false}});
  ASSERT_TRUE(vm) << vm.status().to_string();
  EXPECT_EQ(std::memcmp((*vm)->memory(0), expected(6 * kMiB, 2 * kMiB).data(), 2 * kMiB), 0);
  EXPECT_EQ(server.stop(), 0);
  const std::string log = slurp(dir_ / "server.log");
  for (const char* cause : {"no userfaultfd descriptor", "not a userfaultfd", "not valid JSON",
                            "lies outside the 12582912-byte memfile", "neither 4 KiB nor 2 MiB"}) {
    EXPECT_NE(log.find(cause), std::string::npos) << cause << " not in\n" << log;
  }
}

TEST_P(UffdTest, RecordedWorkingSetIsPrefetchedOnTheNextRestore) {
  const std::filesystem::path record = dir_ / "memfile.prefetch";
  // The pages the first VM touches, in order: a walk over three areas.
  std::vector<uint64_t> touched;
  for (uint64_t offset = 5 * kMiB; offset < 5 * kMiB + 64 * kPage; offset += kPage) {
    touched.push_back(offset);
  }
  for (uint64_t offset = 0; offset < 32 * kPage; offset += kPage) touched.push_back(offset);
  for (uint64_t offset = 9 * kMiB; offset > 8 * kMiB; offset -= 16 * kPage) {
    touched.push_back(offset);
  }
  {
    ServerProcess server = serve({"--record", record.string()});
    ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
    Result<std::unique_ptr<FirecrackerStandIn>> vm =
        FirecrackerStandIn::restore(socket(), {{kMemfileSize, 0, false}});
    ASSERT_TRUE(vm) << vm.status().to_string();
    for (uint64_t offset : touched) {
      ASSERT_EQ(std::memcmp((*vm)->memory(0) + offset, expected(offset, kPage).data(), kPage), 0);
    }
    vm->reset();
    EXPECT_EQ(server.stop(), 0);  // a VM's record is written when it ends
  }
  const std::string text = slurp(record);
  // Consecutive pages merge into runs; the order is the order of first touch.
  std::string want = "lazyblock page record 1\n";
  want += std::to_string(5 * kMiB) + " " + std::to_string(64 * kPage) + "\n";
  want += "0 " + std::to_string(32 * kPage) + "\n";
  for (uint64_t offset = 9 * kMiB; offset > 8 * kMiB; offset -= 16 * kPage) {
    want += std::to_string(offset) + " 4096\n";
  }
  EXPECT_EQ(text, want);

  // Kept beside the build, the record is prefetched at the next restore: the
  // pages become resident without a single touch, byte-exact.
  std::filesystem::copy_file(record, dir_ / "store" / kBuild / "memfile.prefetch");
  ServerProcess server = serve();
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  Result<std::unique_ptr<FirecrackerStandIn>> vm =
      FirecrackerStandIn::restore(socket(), {{kMemfileSize, 0, false}});
  ASSERT_TRUE(vm) << vm.status().to_string();
  std::byte* memory = (*vm)->memory(0);
  const auto all_resident = [&] {
    for (uint64_t offset : touched) {
      if (!resident(memory + offset, kPage)) return false;
    }
    return true;
  };
  while (!all_resident()) {
    ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a real condition
  }
  for (uint64_t offset : touched) {
    ASSERT_EQ(std::memcmp(memory + offset, expected(offset, kPage).data(), kPage), 0) << offset;
  }
  // Pages outside the record were not installed.
  EXPECT_FALSE(resident(memory + 11 * kMiB, kPage));
}

// Bytes of unnamed (deleted) regular files that process `pid` holds: its
// block cache, which fills as fetches bring data.
uint64_t unnamed_file_blocks(pid_t pid) {
  uint64_t blocks = 0;
  for (const std::filesystem::path& file : testing::unnamed_files_of(pid)) {
    struct stat st {};
    if (::stat(file.c_str(), &st) == 0) blocks += static_cast<uint64_t>(st.st_blocks);
  }
  return blocks;
}

// Whether process `pid` holds `file` open: a stream of it is under way.
bool holds_open(pid_t pid, const std::filesystem::path& file) {
  std::error_code error;
  const std::filesystem::path want = std::filesystem::canonical(file, error);
  if (error) return false;
  const std::filesystem::path fds = "/proc/" + std::to_string(pid) + "/fd";
  for (const auto& entry : std::filesystem::directory_iterator(fds, error)) {
    std::error_code link_error;
    if (std::filesystem::read_symlink(entry.path(), link_error) == want && !link_error) return true;
  }
  return false;
}

// SIGTERM while a fault waits on a store that never delivers its chunk: the
// handler exits 0 promptly (not after its 60 s fetch timeout).
TEST_P(UffdTest, SigtermCancelsFetchesInFlight) {
  // Whole chunks only, and every stream stalls after 64 KiB (more than the
  // header): no fault outside the cache can be served.
  ServerProcess server = serve(
      {"--no-prefetch", "--fetch", "full", "--timeout", "60s", "--faults", "stall-after=65536"});
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  Result<std::unique_ptr<FirecrackerStandIn>> vm =
      FirecrackerStandIn::restore(socket(), {{4 * kMiB, 4 * kMiB, false}});
  ASSERT_TRUE(vm) << vm.status().to_string();
  // The fault's fetch is under way once its first bytes reach the cache; a
  // compressed build's frame reaches it only whole and verified, so there
  // once the handler holds the data file open for the frame's stream
  // (looked at before the vCPU runs: after, its fault may have opened it).
  const std::filesystem::path data_file = dir_ / "store" / data_key_;
  const auto fetching = [&] {
    return GetParam() == image::Codec::kNone ? unnamed_file_blocks(server.pid()) > 0
                                             : holds_open(server.pid(), data_file);
  };
  EXPECT_FALSE(holds_open(server.pid(), data_file)) << "a stream before the fault";
  const std::byte* page = (*vm)->memory(0) + 2 * kPage;  // not a zero page
  std::thread vcpu([page] { (void)*reinterpret_cast<const volatile std::byte*>(page); });
  const auto asked = std::chrono::steady_clock::now();
  while (!fetching() && server.running() &&
         std::chrono::steady_clock::now() - asked < std::chrono::seconds(10)) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));  // polling a real condition
  }
  // From here on nothing returns before the vCPU thread is joined: its fault
  // is let go only when the VM closes its userfaultfd.
  const bool fetch_started = fetching();
  bool signalled_ok = false;
  int kill_error = 0;
  bool exited = false;
  double seconds = 0;
  if (fetch_started) {
    const auto signalled = std::chrono::steady_clock::now();
    signalled_ok = ::kill(server.pid(), SIGTERM) == 0;
    kill_error = signalled_ok ? 0 : errno;
    // A hang guard, not a timing assertion: the fetch timeout is 60 s.
    while (signalled_ok && server.running() &&
           std::chrono::steady_clock::now() - signalled < std::chrono::seconds(10)) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a real condition
    }
    exited = !server.running();
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - signalled).count();
  }
  if (!exited) server.kill_hard();
  (*vm)->close_userfaultfd();  // the VM goes too: its waiting fault is let go
  vcpu.join();
  ASSERT_TRUE(fetch_started) << "no fetch began: " << slurp(dir_ / "server.log");
  ASSERT_TRUE(signalled_ok) << std::strerror(kill_error);
  ASSERT_TRUE(exited) << "still running 10 s after SIGTERM: " << slurp(dir_ / "server.log");
  std::printf("serve uffd exited %.3f s after SIGTERM\n", seconds);
  EXPECT_EQ(server.stop(), 0) << slurp(dir_ / "server.log");
}

// The block cache's file cut short under the running handler (as a failing
// disk would make its map fault): the next VM's faults on the lost pages
// are fetched again and every page is right; the handler serves on.
TEST_P(UffdTest, ACacheFileCutShortUnderTheHandlerIsFetchedAgain) {
  ServerProcess server = serve({"--no-prefetch"});
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  const auto want = [&](uint64_t offset) { return expected(offset, kPage); };
  {
    Result<std::unique_ptr<FirecrackerStandIn>> vm =
        FirecrackerStandIn::restore(socket(), {{kMemfileSize, 0, false}});
    ASSERT_TRUE(vm) << vm.status().to_string();
    EXPECT_TRUE(touch_all((*vm)->memory(0), kMemfileSize, kPage, want, 2, 1).empty());
  }
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
  Result<std::unique_ptr<FirecrackerStandIn>> vm =
      FirecrackerStandIn::restore(socket(), {{kMemfileSize, 0, false}});
  ASSERT_TRUE(vm) << vm.status().to_string();
  const std::vector<uint64_t> wrong = touch_all((*vm)->memory(0), kMemfileSize, kPage, want, 2, 2);
  EXPECT_TRUE(wrong.empty()) << wrong.size() << " pages wrong, the first at " << wrong[0];
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  // The cut was met (a copy out of the cache reads short there), not
  // missed: the chunker warns as it fetches the lost bytes again.
  EXPECT_NE(slurp(dir_ / "server.log").find("the cache file could not be read"), std::string::npos)
      << slurp(dir_ / "server.log");
  EXPECT_EQ(server.stop(), 0) << slurp(dir_ / "server.log");
}

}  // namespace
}  // namespace lazyblock
