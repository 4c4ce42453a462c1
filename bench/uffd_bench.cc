#include "bench/uffd_bench.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "bench/bench_util.h"
#include "bench/uffd_serving.h"
#include "common/mapped_region.h"
#include "common/unique_fd.h"
#include "common/units.h"
#include "common/unix_socket.h"
#include "image/device.h"
#include "serve/uffd/uffd_server.h"
#include "storage/file_store.h"
#include "testing/build_fixture.h"
#include "testing/child_process.h"
#include "testing/firecracker_stand_in.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kChunk = 4 * kMiB;
constexpr uint64_t kPatternSeed = 23;
const char* const kBuild = "b0b0b0b0-1111-4222-8333-444455556666";

// Every 8th chunk of the memfile is zeros: mapped to nil, never fetched.
bool zero_chunk(uint64_t chunk) { return chunk % 8 == 5; }

void fill_expected(uint64_t offset, std::span<std::byte> out) {
  if (zero_chunk(offset / kChunk)) {
    std::memset(out.data(), 0, out.size());
  } else {
    testing::fill_pattern(kPatternSeed, offset, out);
  }
}

// The pages of `offsets` in `memory` that differ from the memfile's.
Status verify(const std::byte* memory, const std::vector<uint64_t>& offsets) {
  std::vector<std::byte> want(kPage);
  for (uint64_t offset : offsets) {
    fill_expected(offset, want);
    if (std::memcmp(memory + offset, want.data(), kPage) != 0) {
      return Status::corruption(fmt::format("bench uffd: wrong bytes in the page at {}", offset));
    }
  }
  return Status::ok();
}

// Reads one byte of each page (a fault if it is missing); the latencies, in
// seconds, if `latencies` is given.
void touch(const std::byte* memory, const std::vector<uint64_t>& offsets,
           std::vector<double>* latencies) {
  for (uint64_t offset : offsets) {
    const auto begin = Clock::now();
    const volatile std::byte* page = memory + offset;
    (void)*page;
    if (latencies != nullptr) {
      latencies->push_back(std::chrono::duration<double>(Clock::now() - begin).count());
    }
  }
}

using VmWork = std::function<Result<std::vector<double>>(const std::byte* memory)>;

// Restores a VM of `size` bytes of guest memory from the handler at
// `socket` in a child process, as Firecracker is a process of its own, and
// runs `work` on its memory there; the figures it returns.
Result<std::vector<double>> in_vm_process(const std::filesystem::path& socket, uint64_t size,
                                          const VmWork& work) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return posix_error("pipe", errno);
  UniqueFd from_vm(pipe_fds[0]);
  UniqueFd to_parent(pipe_fds[1]);
  Result<testing::ChildProcess> vm_process = testing::ChildProcess::fork([&] {
    from_vm.reset();
    Result<std::vector<double>> figures = [&]() -> Result<std::vector<double>> {
      Result<std::unique_ptr<testing::FirecrackerStandIn>> vm =
          testing::FirecrackerStandIn::restore(socket, {{size, 0, false}});
      if (!vm) return vm.status();
      return work((*vm)->memory(0));
    }();
    // One byte (1: figures follow, 0: an error message follows), then the rest.
    const std::string payload = figures
                                    ? std::string(reinterpret_cast<const char*>(figures->data()),
                                                  figures->size() * sizeof(double))
                                    : figures.status().to_string();
    const char ok = figures ? 1 : 0;
    (void)!::write(to_parent.get(), &ok, 1);
    for (size_t done = 0; done < payload.size();) {
      const ssize_t n = ::write(to_parent.get(), payload.data() + done, payload.size() - done);
      if (n <= 0) break;
      done += static_cast<size_t>(n);
    }
    return 0;
  });
  if (!vm_process) return vm_process.status();
  to_parent.reset();
  std::string received;
  char buffer[65536];
  for (;;) {
    const ssize_t n = ::read(from_vm.get(), buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    received.append(buffer, static_cast<size_t>(n));
  }
  from_vm.reset();
  vm_process->wait();
  if (received.empty()) return Status::io_error("bench uffd: the VM process died");
  if (received[0] == 0)
    return Status::io_error("bench uffd: in the VM process: " + received.substr(1));
  std::vector<double> figures((received.size() - 1) / sizeof(double));
  std::memcpy(figures.data(), received.data() + 1, figures.size() * sizeof(double));
  return figures;
}

// Touches `pages` one at a time, then checks them: the latencies.
VmWork touch_pages(const std::vector<uint64_t>& pages) {
  return [&pages](const std::byte* memory) -> Result<std::vector<double>> {
    std::vector<double> latencies;
    touch(memory, pages, &latencies);
    LB_RETURN_IF_ERROR(verify(memory, pages));
    return latencies;
  };
}

LatencyFigures figures(std::vector<double> seconds) {
  std::sort(seconds.begin(), seconds.end());
  return {percentile(seconds, 0.5) * 1e6, percentile(seconds, 0.99) * 1e6};
}

// The reference point for warm faults: the smallest handler there is. One
// thread takes one VM, reads one event at a time and copies the page from
// an mmapped file: what remains is the kernel's own round trip.
class MinimalHandler {
 public:
  MinimalHandler(const std::filesystem::path& socket, const std::byte* file) : file_(file) {
    Result<std::unique_ptr<UnixListener>> listening = UnixListener::listen(socket);
    if (!listening) {
      status_ = listening.status();
      return;
    }
    listener_ = std::move(listening).value();
    thread_ = std::thread([this] { status_ = serve(); });
  }
  ~MinimalHandler() {
    if (thread_.joinable()) thread_.join();
  }
  // Once the VM has gone.
  Status finish() {
    if (thread_.joinable()) thread_.join();
    return status_;
  }

 private:
  Status serve() {
    const UniqueFd connection(::accept4(listener_->fd(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!connection) return posix_error("accept", errno);
    char body[4096];
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
    iovec io{body, sizeof body - 1};
    msghdr message{};
    message.msg_iov = &io;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(connection.get(), &message, MSG_CMSG_CLOEXEC);
    cmsghdr* c = CMSG_FIRSTHDR(&message);
    if (n <= 0 || c == nullptr || c->cmsg_type != SCM_RIGHTS) {
      return Status::invalid_argument("minimal handler: no descriptor");
    }
    int received;
    std::memcpy(&received, CMSG_DATA(c), sizeof received);
    const UniqueFd uffd_owner(received);
    const int uffd = uffd_owner.get();
    body[n] = '\0';
    const uint64_t base = nlohmann::json::parse(body)[0]["base_host_virt_addr"].get<uint64_t>();
    pollfd fds[2] = {{uffd, POLLIN, 0}, {connection.get(), POLLIN, 0}};
    for (;;) {
      if (::poll(fds, 2, -1) < 0) continue;
      if (fds[1].revents != 0) break;  // the VM closed its socket
      uffd_msg event;
      if (::read(uffd, &event, sizeof event) != sizeof event) continue;
      if (event.event != UFFD_EVENT_PAGEFAULT) continue;
      const uint64_t page = event.arg.pagefault.address & ~(kPage - 1);
      uffdio_copy copy{};
      copy.dst = page;
      copy.src = reinterpret_cast<uint64_t>(file_ + (page - base));
      copy.len = kPage;
      ::ioctl(uffd, UFFDIO_COPY, &copy);
    }
    return Status::ok();
  }

  const std::byte* const file_;
  std::unique_ptr<UnixListener> listener_;
  std::thread thread_;
  Status status_;
};

class Bench {
 public:
  explicit Bench(const UffdBenchOptions& options) : o_(options) {}

  Result<UffdBenchReport> run() {
    LB_RETURN_IF_ERROR(set_up());
    UffdBenchReport report;
    report.options = o_;
    const double ttfb = std::chrono::duration<double>(o_.profile.ttfb).count();
    const double bw = o_.profile.bytes_per_second;
    report.cold_limit_us = (ttfb + kPage / bw) * 1e6;
    LB_RETURN_IF_ERROR(cold_faults(&report));
    LB_RETURN_IF_ERROR(warm_faults(&report));
    LB_RETURN_IF_ERROR(working_set(&report));
    report.working_set_limit_ms =
        (ttfb + static_cast<double>(report.working_set_bytes) / (o_.parallel * bw)) * 1e3;
    return report;
  }

 private:
  Status set_up() {
    ::prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);  // as in bench fetch: precise pacing
    if (o_.memfile_size < 8 * kChunk || o_.memfile_size % kChunk != 0) {
      return Status::invalid_argument("bench uffd: the memfile must be 8 or more whole chunks");
    }
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    if (!scratch) return scratch.status();
    scratch_ = std::move(scratch).value();
    testing::BuildSpec spec(dir() / "store", kBuild, "memfile");
    spec.map_raw = true;  // the minimal handler copies from it
    Result<testing::PackedBuild> packed = testing::pack_build(spec, o_.memfile_size, fill_expected);
    if (!packed) return packed.status();
    files_ = packed->store;
    build_ = packed->build;
    raw_map_ = std::move(packed->raw);
    return Status::ok();
  }

  std::filesystem::path dir() const { return scratch_->path(); }

  ChunkerOptions chunker_options() const {
    ChunkerOptions options;
    options.cache_dir = dir();
    options.parallel = o_.parallel;
    options.expected_ttfb = o_.profile.ttfb;
    options.expected_bandwidth = o_.profile.bytes_per_second;
    return options;
  }

  // The memfile behind the simulated store, with a cold cache of its own.
  Result<std::unique_ptr<image::Device>> cold_memfile() {
    auto simulated = std::make_shared<SimulateStore>(files_, o_.profile);
    Result<std::unique_ptr<image::Device>> memfile = image::Device::open(
        std::make_shared<image::DataFiles>(simulated, chunker_options()), build_, "memfile");
    // As `serve uffd` does at start, before any VM connects.
    if (memfile) LB_RETURN_IF_ERROR((*memfile)->learn_sizes());
    return memfile;
  }

  // `count` pages at random in chunks that hold data, each in its own chunk
  // where there are enough.
  std::vector<uint64_t> random_pages(int count, uint64_t seed) const {
    std::mt19937_64 rng(seed);
    std::vector<uint64_t> chunks;
    for (uint64_t chunk = 0; chunk < o_.memfile_size / kChunk; ++chunk) {
      if (!zero_chunk(chunk)) chunks.push_back(chunk);
    }
    std::shuffle(chunks.begin(), chunks.end(), rng);
    std::vector<uint64_t> pages;
    for (int i = 0; i < count; ++i) {
      const uint64_t chunk = chunks[static_cast<size_t>(i) % chunks.size()];
      pages.push_back(chunk * kChunk + (rng() % (kChunk / kPage)) * kPage);
    }
    // Distinct pages: a page touched twice is no second fault.
    std::sort(pages.begin(), pages.end());
    pages.erase(std::unique(pages.begin(), pages.end()), pages.end());
    std::shuffle(pages.begin(), pages.end(), rng);
    return pages;
  }

  Status cold_faults(UffdBenchReport* report) {
    Result<std::unique_ptr<image::Device>> memfile = cold_memfile();
    if (!memfile) return memfile.status();
    UffdServing serving(**memfile, {});
    const std::filesystem::path socket = dir() / "cold.sock";
    LB_RETURN_IF_ERROR(serving.start(socket));
    const std::vector<uint64_t> pages = random_pages(o_.cold_faults, o_.seed);
    Result<std::vector<double>> latencies =
        in_vm_process(socket, o_.memfile_size, touch_pages(pages));
    if (!latencies) return latencies.status();
    report->cold = figures(*latencies);
    return serving.stop();
  }

  Status warm_faults(UffdBenchReport* report) {
    Result<std::unique_ptr<image::Device>> memfile = cold_memfile();
    if (!memfile) return memfile.status();
    // Warm the whole cache first.
    class Discard final : public ByteSink {
     public:
      Status write(std::span<const std::byte>) override { return Status::ok(); }
    } discard;
    LB_RETURN_IF_ERROR((*memfile)->write_to(discard));
    const std::vector<uint64_t> pages = random_pages(o_.warm_faults, o_.seed + 1);
    std::vector<double> ours, minimal;
    const auto measure_minimal = [&]() -> Status {
      const std::filesystem::path socket = dir() / "minimal.sock";
      MinimalHandler handler(socket, raw_map_.data());
      Result<std::vector<double>> latencies =
          in_vm_process(socket, o_.memfile_size, touch_pages(pages));
      if (!latencies) return latencies.status();
      minimal.insert(minimal.end(), latencies->begin(), latencies->end());
      return handler.finish();
    };
    const auto measure_ours = [&]() -> Status {
      UffdServing serving(**memfile, {});
      const std::filesystem::path socket = dir() / "warm.sock";
      LB_RETURN_IF_ERROR(serving.start(socket));
      Result<std::vector<double>> latencies =
          in_vm_process(socket, o_.memfile_size, touch_pages(pages));
      if (!latencies) return latencies.status();
      ours.insert(ours.end(), latencies->begin(), latencies->end());
      return serving.stop();
    };
    // Rounds interleaved, each handler first in half of them, so that both
    // see the same machine.
    for (int round = 0; round < 4; ++round) {
      if (round % 2 == 0) {
        LB_RETURN_IF_ERROR(measure_minimal());
        LB_RETURN_IF_ERROR(measure_ours());
      } else {
        LB_RETURN_IF_ERROR(measure_ours());
        LB_RETURN_IF_ERROR(measure_minimal());
      }
    }
    report->warm = figures(ours);
    report->warm_baseline = figures(minimal);
    return Status::ok();
  }

  // Chunks holding data, `working_set` bytes of them, in a random order.
  std::vector<uint64_t> working_set_chunks() const {
    std::mt19937_64 rng(o_.seed + 2);
    std::vector<uint64_t> chunks;
    for (uint64_t chunk = 0; chunk < o_.memfile_size / kChunk; ++chunk) {
      if (!zero_chunk(chunk)) chunks.push_back(chunk);
    }
    std::shuffle(chunks.begin(), chunks.end(), rng);
    chunks.resize(std::min<size_t>(chunks.size(), std::max<uint64_t>(1, o_.working_set / kChunk)));
    return chunks;
  }

  // vCPU v sweeps chunks v, v + vcpus, ... page by page; the milliseconds
  // from restore until every vCPU is done.
  Result<double> sweep(const std::filesystem::path& socket, const std::vector<uint64_t>& chunks) {
    std::vector<std::vector<uint64_t>> pages(static_cast<size_t>(o_.vcpus));
    for (size_t i = 0; i < chunks.size(); ++i) {
      for (uint64_t page = 0; page < kChunk; page += kPage) {
        pages[i % pages.size()].push_back(chunks[i] * kChunk + page);
      }
    }
    const auto begin = Clock::now();
    Result<std::vector<double>> done = in_vm_process(
        socket, o_.memfile_size, [&](const std::byte* memory) -> Result<std::vector<double>> {
          std::vector<std::thread> vcpus;
          for (const std::vector<uint64_t>& mine : pages) {
            vcpus.emplace_back([memory, &mine] { touch(memory, mine, nullptr); });
          }
          for (std::thread& vcpu : vcpus) vcpu.join();
          const double ms = std::chrono::duration<double, std::milli>(Clock::now() - begin).count();
          for (const std::vector<uint64_t>& mine : pages) LB_RETURN_IF_ERROR(verify(memory, mine));
          return std::vector<double>{ms};
        });
    if (!done) return done.status();
    return done->at(0);
  }

  Status working_set(UffdBenchReport* report) {
    const std::vector<uint64_t> chunks = working_set_chunks();
    report->working_set_bytes = chunks.size() * kChunk;
    const std::filesystem::path record = dir() / "memfile.prefetch";
    {
      Result<std::unique_ptr<image::Device>> memfile = cold_memfile();
      if (!memfile) return memfile.status();
      uffd::UffdOptions options;
      options.record = record;
      UffdServing serving(**memfile, options);
      const std::filesystem::path socket = dir() / "record.sock";
      LB_RETURN_IF_ERROR(serving.start(socket));
      Result<double> ms = sweep(socket, chunks);
      if (!ms) return ms.status();
      report->without_prefetch_ms = *ms;
      LB_RETURN_IF_ERROR(serving.stop());
    }
    Result<std::vector<uffd::PageRun>> runs = uffd::read_page_record(record);
    if (!runs) return runs.status();
    Result<std::unique_ptr<image::Device>> memfile = cold_memfile();
    if (!memfile) return memfile.status();
    uffd::UffdOptions options;
    options.prefetch = *runs;
    UffdServing serving(**memfile, options);
    const std::filesystem::path socket = dir() / "prefetch.sock";
    LB_RETURN_IF_ERROR(serving.start(socket));
    Result<double> ms = sweep(socket, chunks);
    if (!ms) return ms.status();
    report->with_prefetch_ms = *ms;
    report->prefetched_pages = serving.server().stats().prefetched;
    return serving.stop();
  }

  const UffdBenchOptions o_;
  std::optional<testing::ScratchDir> scratch_;
  std::shared_ptr<FileStore> files_;
  image::Uuid build_;
  MappedRegion raw_map_;
};

}  // namespace

Result<UffdBenchReport> run_uffd_bench(const UffdBenchOptions& options) {
  Bench bench(options);
  return bench.run();
}

std::string format_uffd_report(const UffdBenchReport& report) {
  const UffdBenchOptions& o = report.options;
  return fmt::format(
      "bench uffd: a {} memfile, profile {} ({}), {} vCPUs, {} streams\n"
      "cold faults    p50 {:8.0f} us  p99 {:8.0f} us   limit {:.0f} us (TTFB + 4 KiB/BW)\n"
      "warm faults    p50 {:8.1f} us  p99 {:8.1f} us   minimal handler: p50 {:.1f} us, p99 {:.1f} "
      "us\n"
      "working set    {}: {:.0f} ms without prefetch, {:.0f} ms with ({:.1f}x faster; {:.2f} x "
      "the limit {:.0f} ms = TTFB + set / ({} x BW)); {} pages prefetched\n",
      format_size(o.memfile_size), o.profile_name, o.profile.to_string(), o.vcpus, o.parallel,
      report.cold.p50_us, report.cold.p99_us, report.cold_limit_us, report.warm.p50_us,
      report.warm.p99_us, report.warm_baseline.p50_us, report.warm_baseline.p99_us,
      format_size(report.working_set_bytes), report.without_prefetch_ms, report.with_prefetch_ms,
      report.without_prefetch_ms / report.with_prefetch_ms,
      report.with_prefetch_ms / report.working_set_limit_ms, report.working_set_limit_ms,
      o.parallel, report.prefetched_pages);
}

nlohmann::json uffd_report_json(const UffdBenchReport& report) {
  const auto latency = [](const LatencyFigures& f) {
    return nlohmann::json{{"p50_us", f.p50_us}, {"p99_us", f.p99_us}};
  };
  return {{"profile", report.options.profile_name},
          {"memfile_size", report.options.memfile_size},
          {"cold", latency(report.cold)},
          {"cold_limit_us", report.cold_limit_us},
          {"warm", latency(report.warm)},
          {"warm_minimal_handler", latency(report.warm_baseline)},
          {"working_set",
           {{"bytes", report.working_set_bytes},
            {"limit_ms", report.working_set_limit_ms},
            {"without_prefetch_ms", report.without_prefetch_ms},
            {"with_prefetch_ms", report.with_prefetch_ms},
            {"speedup", report.without_prefetch_ms / report.with_prefetch_ms},
            {"of_limit", report.with_prefetch_ms / report.working_set_limit_ms},
            {"prefetched_pages", report.prefetched_pages}}}};
}

}  // namespace lazyblock
