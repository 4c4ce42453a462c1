#include "serve/uffd/uffd_server.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <system_error>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/io_context.h"
#include "common/log.h"
#include "common/units.h"
#include "common/unix_socket.h"
#include "serve/uffd/guest_regions.h"

namespace lazyblock::uffd {
namespace {

// Mappings larger than this are not a VM's: Firecracker sends one small
// object per memory region.
constexpr size_t kMaxMappingsBytes = 1 * kMiB;
// The prefetch installs up to this much with one ioctl (once all of it is
// cached): a page at a time would cost a system call per 4 KiB.
constexpr uint64_t kPrefetchPiece = 256 * kKiB;
// How many pieces ahead of the first one still missing the prefetch looks
// for pieces already cached: more than the streams bring at once.
constexpr size_t kPrefetchWindow = 256;
// How soon an install that failed with EAGAIN is tried again when no event
// comes to say the VM's memory map is stable.
constexpr std::chrono::milliseconds kRetryInstallAfter{1};
// How long the event thread looks for the next event without sleeping.
constexpr std::chrono::microseconds kSpinAfterEvent{50};
// A fault whose fetch failed is tried again after this, doubling up to the
// cap, for as long as the VM lives.
constexpr std::chrono::milliseconds kFirstRetryDelay{100};
constexpr std::chrono::milliseconds kMaxRetryDelay{10000};

// Zeros to copy where UFFDIO_ZEROPAGE does not apply (hugetlbfs pages).
std::span<const std::byte> zeros(uint64_t length) {
  static const std::vector<std::byte> kZeros(2 * kMiB);
  return std::span(kZeros).first(length);
}

// The calling thread's buffer for the bytes it installs next, `size` bytes
// of it. Pages are copied out of the cache into it, never installed from
// the cache's map: a copy can be checked before it goes into the VM (see
// Disk::read_cached), a view of a cache file cut short may be its zeros.
// Kept, not made per fault, which would cost its first-touch faults each
// time.
std::span<std::byte> thread_buffer(uint64_t size) {
  thread_local std::vector<std::byte> buffer;
  if (buffer.size() < size) buffer.resize(size);
  return std::span(buffer).first(size);
}

// The event threads of all servers in this process that may spin at once:
// one core is left for the vCPUs and the fetches. With more VMs than cores,
// threads that each spun after every event kept the cores busy looking for
// events while the vCPUs that would raise them waited for a core.
int spinners_allowed() {
  static const int allowed =
      static_cast<int>(std::max(1u, std::thread::hardware_concurrency())) - 1;
  return allowed;
}
std::atomic<int> spinning_event_threads{0};

// Looks for an event in `fds` without sleeping, for up to kSpinAfterEvent
// after `last_event`, if a spinning slot is free; 0 if none came.
int spin_for_event(std::span<pollfd> fds, Clock::time_point last_event) {
  if (spinning_event_threads.fetch_add(1, std::memory_order_relaxed) >= spinners_allowed()) {
    spinning_event_threads.fetch_sub(1, std::memory_order_relaxed);
    return 0;
  }
  int ready = 0;
  while (ready == 0 && Clock::now() - last_event < kSpinAfterEvent) {
    ready = ::poll(fds.data(), fds.size(), 0);
  }
  spinning_event_threads.fetch_sub(1, std::memory_order_relaxed);
  return ready;
}

// Whether `fd` is a userfaultfd (an anonymous inode of that name).
bool is_userfaultfd(int fd) {
  char target[64] = {};
  const std::string link = fmt::format("/proc/self/fd/{}", fd);
  const ssize_t n = ::readlink(link.c_str(), target, sizeof target - 1);
  return n > 0 && std::string_view(target, static_cast<size_t>(n)).find("userfaultfd") !=
                      std::string_view::npos;
}

}  // namespace

// One VM: its descriptor, its regions, and the threads serving it.
class UffdServer::Session {
 public:
  // `socket` is the registry's, open until run() returns.
  Session(UffdServer& server, int socket) : server_(server), socket_(socket) {}

  // The whole life of the connection: handshake, serving, cleanup.
  void run();
  // Ends serving (the server stops). Thread-safe.
  void stop();

 private:
  // A guest page: where it is mapped and where its bytes are in the memfile.
  struct Page {
    uint64_t address;
    uint64_t offset;
    uint64_t size;
    bool huge;
    std::chrono::steady_clock::time_point faulted{};  // for the observer's latency
  };
  enum class Install { kInstalled, kExisted, kAgain, kNoTarget, kFailed };

  Status receive_mappings();
  Status serve_events();
  // Reads every queued event; page faults' addresses go to `faults`. False
  // once the descriptor is closed.
  Result<bool> drain_events(std::vector<uint64_t>* faults);
  void on_remove(uint64_t start, uint64_t end);
  // Serves the fault at once if its page is cached or zero, else hands it
  // to a worker. `retry`: a fault already counted, deferred after EAGAIN.
  Install handle_fault(uint64_t address, bool retry);
  // On a worker: waits for the page's bytes, installs them.
  void fetch_and_install(Page page);
  // Tells the server's observer, if any, of a fault resolved.
  void observe(ServeObserver::FaultOutcome outcome, std::chrono::steady_clock::time_point faulted) {
    if (server_.observer_ != nullptr) {
      server_.observer_->uffd_fault(outcome, std::chrono::steady_clock::now() - faulted);
    }
  }
  // On its own thread: fetches and installs the prefetch list.
  void prefetch();
  // Installs memfile [begin, end) of `region` (whole pages) where the VM
  // has no page yet, once its bytes are cached.
  void prefetch_range(const GuestRegion& region, uint64_t begin, uint64_t end);

  std::optional<Page> page_at(uint64_t address) const;
  Install copy(const Page& page, std::span<const std::byte> bytes);
  Install zero(const Page& page);
  Install result_of(int error, const Page& page, const char* what);
  bool removed_locked(uint64_t address) const REQUIRES(mu_);
  void wake_events();

  UffdServer& server_;
  const int socket_;
  UniqueFd uffd_;
  UniqueFd wake_;  // an eventfd: deferred faults to retry, or stop
  std::vector<GuestRegion> regions_;
  PageRecorder recorder_;
  std::thread prefetcher_;

  Mutex mu_;
  CondVar changed_;  // tasks_, drained_ or stopping_ changed
  bool stopping_ GUARDED_BY(mu_) = false;
  int tasks_ GUARDED_BY(mu_) = 0;                   // worker tasks not yet finished
  uint64_t drained_ GUARDED_BY(mu_) = 0;            // rounds of events drained
  std::set<uint64_t> in_flight_ GUARDED_BY(mu_);    // pages handed to workers
  std::vector<uint64_t> deferred_ GUARDED_BY(mu_);  // worker installs that got EAGAIN
  // Guarded by mu_: pages whose fetch failed, by when to try again, and the
  // delay before the next try of each (doubling).
  std::multimap<Clock::time_point, uint64_t> retry_due_ GUARDED_BY(mu_);
  std::map<uint64_t, std::chrono::milliseconds> retry_delay_ GUARDED_BY(mu_);
  std::map<uint64_t, uint64_t> removed_ GUARDED_BY(mu_);  // start -> end, disjoint
};

void UffdServer::Session::run() {
  if (Status s = receive_mappings(); !s.is_ok()) {
    log(s.code() == StatusCode::kCancelled ? LogLevel::kDebug : LogLevel::kError,
        "serve uffd: connection refused: {}", s.to_string());
    return;
  }
  wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_) {
    log(LogLevel::kError, "serve uffd: {}", posix_error("eventfd", errno).to_string());
    return;
  }
  uint64_t bytes = 0;
  for (const GuestRegion& region : regions_) bytes += region.size;
  log(LogLevel::kInfo, "serve uffd: VM connected: {} regions, {} of guest memory", regions_.size(),
      format_size(bytes));
  if (!server_.options_.prefetch.empty()) prefetcher_ = std::thread([this] { prefetch(); });

  const Status served = serve_events();
  if (!served.is_ok()) log(LogLevel::kError, "serve uffd: {}", served.to_string());
  {
    MutexLock lock(mu_);
    stopping_ = true;
    changed_.notify_all();
    changed_.wait(lock, [&]() REQUIRES(mu_) { return tasks_ == 0; });
  }
  if (prefetcher_.joinable()) prefetcher_.join();
  if (!server_.options_.record.empty()) {
    const std::vector<PageRun> runs = recorder_.runs();
    if (Status s = write_page_record(server_.options_.record, runs); !s.is_ok()) {
      log(LogLevel::kError, "serve uffd: {}", s.to_string());
    } else {
      log(LogLevel::kInfo, "serve uffd: recorded {} runs of first faults in {}", runs.size(),
          server_.options_.record.string());
    }
  }
  log(LogLevel::kInfo, "serve uffd: VM ended");
}

void UffdServer::Session::stop() {
  {
    MutexLock lock(mu_);
    stopping_ = true;
    changed_.notify_all();
  }
  // Wakes the handshake or the event loop, whichever runs.
  ::shutdown(socket_, SHUT_RDWR);
}

Status UffdServer::Session::receive_mappings() {
  const std::chrono::milliseconds timeout = server_.options_.limits.handshake_timeout;
  const Clock::time_point deadline = Clock::now() + timeout;
  std::string body;
  std::vector<char> buffer(64 * 1024);
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) {
      return Status::timeout(
          !uffd_ ? fmt::format("no userfaultfd descriptor within {} ms", timeout.count())
                 : fmt::format("the memory mappings did not arrive whole "
                               "within {} ms",
                               timeout.count()));
    }
    pollfd fds{socket_, POLLIN, 0};
    const int ready = ::poll(&fds, 1, static_cast<int>(left.count()));
    if (ready < 0 && errno != EINTR) return posix_error("poll", errno);
    if (ready <= 0) continue;
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 4)];
    iovec io{buffer.data(), buffer.size()};
    msghdr message{};
    message.msg_iov = &io;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
    const ssize_t n = ::recvmsg(socket_, &message, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EAGAIN || errno == EINTR) continue;
      return posix_error("receiving the memory mappings", errno);
    }
    for (cmsghdr* c = CMSG_FIRSTHDR(&message); c != nullptr; c = CMSG_NXTHDR(&message, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        if (!uffd_) {
          uffd_.reset(fd);
        } else {
          UniqueFd extra(fd);  // one descriptor per VM: extra ones are not ours to keep
        }
      }
    }
    if (message.msg_flags & MSG_CTRUNC) {
      return Status::invalid_argument("the VM sent more descriptors than one");
    }
    if (n == 0) {
      // A probe (is the socket up?) rather than a VM: not worth an error.
      if (body.empty()) return Status::cancelled("a client connected and left without a word");
      if (!uffd_) {
        return Status::invalid_argument(
            "the VM sent its memory mappings but no userfaultfd "
            "descriptor, and closed the connection");
      }
      break;  // whatever came is all there is
    }
    body.append(buffer.data(), static_cast<size_t>(n));
    if (body.size() > kMaxMappingsBytes) {
      return Status::invalid_argument(
          fmt::format("the memory mappings exceed {}", format_size(kMaxMappingsBytes)));
    }
    // The body may come before the descriptor is readable: wait for both.
    if (uffd_ && nlohmann::json::accept(body)) break;
  }
  if (!is_userfaultfd(uffd_.get())) {
    return Status::invalid_argument("the descriptor the VM sent is not a userfaultfd");
  }
  Result<std::vector<GuestRegion>> regions = parse_guest_regions(body, server_.memfile_.size());
  if (!regions) return regions.status();
  regions_ = std::move(regions).value();
  // Events are read until none is left: the descriptor must not block.
  const int flags = ::fcntl(uffd_.get(), F_GETFL);
  if (flags < 0 || ::fcntl(uffd_.get(), F_SETFL, flags | O_NONBLOCK) != 0) {
    return posix_error("making the userfaultfd non-blocking", errno);
  }
  return Status::ok();
}

Status UffdServer::Session::serve_events() {
  std::vector<uint64_t> faults;
  Clock::time_point last_event = Clock::now();
  for (;;) {
    pollfd fds[3] = {{uffd_.get(), POLLIN, 0}, {socket_, POLLIN, 0}, {wake_.get(), POLLIN, 0}};
    // Faults come in bursts (a vCPU touches page after page): for a moment
    // after one, look for the next without sleeping, which saves the
    // wake-up of a blocked thread on each.
    int ready = spin_for_event(fds, last_event);
    // An install that failed with EAGAIN is retried after the events are
    // drained; but the kernel lets installs fail a moment longer, until the
    // thread whose REMOVE we read has run on, and no event tells us when:
    // with installs to retry, look again soon even if nothing comes.
    int timeout_ms = -1;
    {
      MutexLock lock(mu_);
      if (!deferred_.empty()) {
        timeout_ms = static_cast<int>(kRetryInstallAfter.count());
      } else if (!retry_due_.empty()) {
        // Until the first failed fetch is due to be tried again.
        timeout_ms = static_cast<int>(std::clamp<int64_t>(
            std::chrono::ceil<std::chrono::milliseconds>(retry_due_.begin()->first - Clock::now())
                .count(),
            0, kMaxRetryDelay.count()));
      }
    }
    if (ready == 0) ready = ::poll(fds, 3, timeout_ms);
    if (ready < 0) {
      if (errno == EINTR) continue;
      return posix_error("poll", errno);
    }
    last_event = Clock::now();
    if (fds[2].revents & POLLIN) {
      uint64_t count;
      (void)!::read(wake_.get(), &count, sizeof count);
    }
    {
      MutexLock lock(mu_);
      if (stopping_) return Status::ok();
    }
    if (fds[1].revents & (POLLIN | POLLHUP | POLLERR)) {
      // Firecracker sends nothing more: data or an end both mean the VM's
      // side is done with us once it closes.
      char ignored[256];
      const ssize_t n = ::recv(socket_, ignored, sizeof ignored, MSG_DONTWAIT);
      if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        log(LogLevel::kInfo, "serve uffd: the VM closed its socket");
        return Status::ok();
      }
    }
    if (fds[0].revents & (POLLERR | POLLHUP | POLLNVAL)) {
      log(LogLevel::kInfo, "serve uffd: the userfaultfd was closed");
      return Status::ok();
    }
    faults.clear();
    Result<bool> open = drain_events(&faults);
    if (!open) return open.status();
    if (!*open) return Status::ok();
    std::vector<uint64_t> retries;
    {
      MutexLock lock(mu_);
      retries.swap(deferred_);
      const Clock::time_point now = Clock::now();
      while (!retry_due_.empty() && retry_due_.begin()->first <= now) {
        retries.push_back(retry_due_.begin()->second);
        retry_due_.erase(retry_due_.begin());
      }
      ++drained_;
      changed_.notify_all();
    }
    std::vector<uint64_t> again;
    for (uint64_t address : retries) {
      if (handle_fault(address, /*retry=*/true) == Install::kAgain) again.push_back(address);
    }
    for (uint64_t address : faults) {
      if (handle_fault(address, /*retry=*/false) == Install::kAgain) again.push_back(address);
    }
    if (!again.empty()) {
      // An event is queued again: the descriptor polls readable, the next
      // round drains it and retries these.
      MutexLock lock(mu_);
      deferred_.insert(deferred_.end(), again.begin(), again.end());
    }
  }
}

Result<bool> UffdServer::Session::drain_events(std::vector<uint64_t>* faults) {
  uffd_msg messages[64];
  for (;;) {
    const ssize_t n = ::read(uffd_.get(), messages, sizeof messages);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return true;
      return posix_error("reading the userfaultfd", errno);
    }
    if (n == 0) return false;
    const size_t count = static_cast<size_t>(n) / sizeof(uffd_msg);
    for (size_t i = 0; i < count; ++i) {
      const uffd_msg& message = messages[i];
      switch (message.event) {
        case UFFD_EVENT_PAGEFAULT:
          faults->push_back(message.arg.pagefault.address);
          break;
        case UFFD_EVENT_REMOVE:
          on_remove(message.arg.remove.start, message.arg.remove.end);
          break;
        case UFFD_EVENT_UNMAP:
          // The range is gone from the VM: nothing there to serve any more.
          on_remove(message.arg.remove.start, message.arg.remove.end);
          break;
        default:
          log(LogLevel::kWarn, "serve uffd: ignoring userfaultfd event {}", message.event);
          break;
      }
    }
    // Fewer than asked for: the queue was empty a moment ago. (What came
    // since polls readable; a REMOVE among it makes installs fail with
    // EAGAIN until it is read.) Saves a system call per fault.
    if (count < std::size(messages)) return true;
  }
}

void UffdServer::Session::on_remove(uint64_t start, uint64_t end) {
  if (start >= end) return;
  server_.counters_.removed.fetch_add(1, std::memory_order_relaxed);
  {
    MutexLock lock(mu_);
    // Keep removed_ disjoint: merge with every range that touches [start, end).
    auto it = removed_.upper_bound(start);
    if (it != removed_.begin() && std::prev(it)->second >= start) --it;
    while (it != removed_.end() && it->first <= end) {
      start = std::min(start, it->first);
      end = std::max(end, it->second);
      it = removed_.erase(it);
    }
    removed_.emplace(start, end);
  }
  // The pages there are the guest's fresh memory now: zeros. Unregistered,
  // the kernel gives zero pages itself, with no round trip to us; if that
  // fails, faults there are served as zero pages (see handle_fault).
  uffdio_range range{start, end - start};
  if (::ioctl(uffd_.get(), UFFDIO_UNREGISTER, &range) != 0) {
    log(LogLevel::kDebug, "serve uffd: unregistering removed [{:#x}, {:#x}): {}", start, end,
        posix_error("ioctl", errno).to_string());
  }
}

bool UffdServer::Session::removed_locked(uint64_t address) const {
  auto it = removed_.upper_bound(address);
  return it != removed_.begin() && address < std::prev(it)->second;
}

std::optional<UffdServer::Session::Page> UffdServer::Session::page_at(uint64_t address) const {
  const GuestRegion* region = region_at(regions_, address);
  if (region == nullptr) return std::nullopt;
  const uint64_t page = align_down(address, region->page_size);
  return Page{page, region->offset + (page - region->base), region->page_size, region->huge()};
}

UffdServer::Session::Install UffdServer::Session::handle_fault(uint64_t address, bool retry) {
  const std::optional<Page> page = page_at(address);
  if (!page) {
    log(LogLevel::kError, "serve uffd: fault at {:#x}, outside every region the VM sent", address);
    return Install::kNoTarget;
  }
  if (!retry) {
    server_.counters_.faults.fetch_add(1, std::memory_order_relaxed);
    if (!server_.options_.record.empty()) recorder_.touched(page->offset, page->size);
  }
  bool removed;
  {
    MutexLock lock(mu_);
    removed = removed_locked(page->address);
    // A page being fetched is installed by its worker, which wakes every
    // vCPU waiting on it.
    if (!removed && !retry && in_flight_.contains(page->address)) return Install::kExisted;
  }
  image::Disk& memfile = server_.memfile_;
  const auto faulted = std::chrono::steady_clock::now();
  Install result;
  if (removed || memfile.is_zero(page->offset, page->size)) {
    result = zero(*page);
    if (result != Install::kAgain) {
      server_.counters_.served_zero.fetch_add(1);
      observe(ServeObserver::FaultOutcome::kZero, faulted);
    }
  } else if (const std::span<std::byte> bytes = thread_buffer(page->size);
             memfile.read_cached(bytes, page->offset)) {
    result = copy(*page, bytes);
    if (result != Install::kAgain) {
      server_.counters_.served_cached.fetch_add(1);
      observe(ServeObserver::FaultOutcome::kCached, faulted);
    }
  } else {
    {
      MutexLock lock(mu_);
      in_flight_.insert(page->address);
      ++tasks_;
    }
    Page fetched = *page;
    fetched.faulted = faulted;
    server_.workers_->submit([this, fetched] { fetch_and_install(fetched); });
    return Install::kInstalled;
  }
  if (retry && result != Install::kAgain) {
    MutexLock lock(mu_);
    in_flight_.erase(page->address);
    retry_delay_.erase(page->address);
  }
  return result;
}

void UffdServer::Session::fetch_and_install(Page page) {
  // read() fetches what is missing, and fetches again what it finds lost
  // (a cache file cut short, a disk error) rather than copy its holes.
  const std::span<std::byte> bytes = thread_buffer(page.size);
  const Result<size_t> got = server_.memfile_.read(bytes, page.offset);
  const Install result = got ? copy(page, bytes) : Install::kFailed;
  if (got && result != Install::kAgain) {
    server_.counters_.served_fetched.fetch_add(1);
    observe(ServeObserver::FaultOutcome::kFetched, page.faulted);
  }
  MutexLock lock(mu_);
  if (!got && !stopping_) {
    // The vCPU must not see wrong bytes: it waits while the event thread
    // tries again later, with this worker free for other faults meanwhile
    // (a broken object must not hold up every VM of the host).
    auto [delay, first] = retry_delay_.try_emplace(page.address, kFirstRetryDelay);
    log(LogLevel::kError,
        "serve uffd: page at {:#x} (memfile [{}, +{})): {}; trying again in {} ms", page.address,
        page.offset, page.size, got.status().to_string(), delay->second.count());
    retry_due_.emplace(Clock::now() + delay->second, page.address);
    delay->second = std::min(2 * delay->second, kMaxRetryDelay);
    wake_events();
  } else if (result == Install::kAgain && !stopping_) {
    // The event thread drains the queued event, then installs the page
    // (cached by now) itself, or hands it back to a worker.
    deferred_.push_back(page.address);
    wake_events();
  } else {
    in_flight_.erase(page.address);
    retry_delay_.erase(page.address);
  }
  --tasks_;
  changed_.notify_all();
}

void UffdServer::Session::prefetch() {
  image::Disk& memfile = server_.memfile_;
  struct Piece {
    const GuestRegion* region;
    uint64_t begin;  // memfile offsets, whole pages of the region
    uint64_t end;
  };
  std::deque<Piece> pending;
  for (const PageRun& run : server_.options_.prefetch) {
    memfile.prefetch(run.offset, run.length);
    for (uint64_t offset = run.offset; offset < run.offset + run.length;) {
      const GuestRegion* region = region_of_offset(regions_, offset);
      if (region == nullptr) break;  // not guest memory in this VM
      const uint64_t begin =
          region->offset + align_down(offset - region->offset, region->page_size);
      const uint64_t end = std::min({align_up(run.offset + run.length, region->page_size),
                                     region->offset + region->size,
                                     begin + std::max(kPrefetchPiece, region->page_size)});
      pending.push_back({region, begin, end});
      offset = end;
    }
  }
  // Data arrives from several streams at once, not in the record's order:
  // install, in record order, every piece near the front whose bytes are
  // here; then wait for the first that is not.
  while (!pending.empty()) {
    {
      MutexLock lock(mu_);
      if (stopping_) return;
    }
    const size_t window = std::min(pending.size(), kPrefetchWindow);
    size_t kept = 0;
    for (size_t i = 0; i < window; ++i) {
      const Piece& piece = pending[i];
      if (memfile.is_zero(piece.begin, piece.end - piece.begin) ||
          memfile.cached_view(piece.begin, piece.end - piece.begin)) {
        prefetch_range(*piece.region, piece.begin, piece.end);
      } else {
        pending[kept++] = piece;
      }
    }
    pending.erase(pending.begin() + static_cast<ptrdiff_t>(kept),
                  pending.begin() + static_cast<ptrdiff_t>(window));
    if (pending.empty()) break;
    // Waits for the front piece's bytes, then installs them.
    prefetch_range(*pending.front().region, pending.front().begin, pending.front().end);
    pending.pop_front();
  }
}

void UffdServer::Session::prefetch_range(const GuestRegion& region, uint64_t begin, uint64_t end) {
  image::Disk& memfile = server_.memfile_;
  const bool zero = memfile.is_zero(begin, end - begin);
  std::span<const std::byte> bytes;
  if (zero && region.huge()) {
    bytes = zeros(end - begin);
  } else if (!zero) {
    const std::span<std::byte> buffer = thread_buffer(end - begin);
    if (!memfile.read(buffer, begin)) return;  // a fault there will fetch (and report) it again
    bytes = buffer;
  }
  // One ioctl installs the whole range, stopping short at a page already
  // there (a vCPU got to it first: skip it) or at a queued event (drain).
  uint64_t done = 0;
  const uint64_t length = end - begin;
  while (done < length) {
    const uint64_t address = region.base + (begin - region.offset) + done;
    uint64_t drained;
    {
      MutexLock lock(mu_);
      if (stopping_ || removed_locked(address)) return;
      drained = drained_;
    }
    int64_t progress;
    int result;
    if (bytes.empty()) {
      uffdio_zeropage request{};
      request.range = {address, length - done};
      result = ::ioctl(uffd_.get(), UFFDIO_ZEROPAGE, &request);
      progress = request.zeropage;
    } else {
      uffdio_copy request{};
      request.dst = address;
      request.src = reinterpret_cast<uint64_t>(bytes.data() + done);
      request.len = length - done;
      result = ::ioctl(uffd_.get(), UFFDIO_COPY, &request);
      progress = request.copy;
    }
    const int error = errno;
    if (result == 0) progress = static_cast<int64_t>(length - done);
    if (progress > 0) {
      server_.counters_.prefetched.fetch_add(static_cast<uint64_t>(progress) / region.page_size);
      done += static_cast<uint64_t>(progress);
      continue;
    }
    switch (error) {
      case EEXIST:
        done += region.page_size;
        break;
      case EAGAIN: {
        // A REMOVE event is queued: wait until the event thread drained it
        // (or a moment, if it was drained already and the VM's side has
        // yet to finish it).
        MutexLock lock(mu_);
        changed_.wait_for(lock, kRetryInstallAfter,
                          [&]() REQUIRES(mu_) { return stopping_ || drained_ != drained; });
        break;
      }
      case ENOENT:
      case ESRCH:
        return;  // unregistered, unmapped, or the VM is gone
      default:
        log(LogLevel::kError, "serve uffd: prefetch of [{:#x}, +{}): {}", address, length - done,
            posix_error("ioctl", error).to_string());
        return;
    }
  }
}

UffdServer::Session::Install UffdServer::Session::copy(const Page& page,
                                                       std::span<const std::byte> bytes) {
  uffdio_copy request{};
  request.dst = page.address;
  request.src = reinterpret_cast<uint64_t>(bytes.data());
  request.len = page.size;
  if (::ioctl(uffd_.get(), UFFDIO_COPY, &request) == 0) return Install::kInstalled;
  return result_of(errno, page, "UFFDIO_COPY");
}

UffdServer::Session::Install UffdServer::Session::zero(const Page& page) {
  // hugetlbfs has no zero page to map: copy zeros instead.
  if (page.huge) return copy(page, zeros(page.size));
  uffdio_zeropage request{};
  request.range = {page.address, page.size};
  if (::ioctl(uffd_.get(), UFFDIO_ZEROPAGE, &request) == 0) return Install::kInstalled;
  return result_of(errno, page, "UFFDIO_ZEROPAGE");
}

UffdServer::Session::Install UffdServer::Session::result_of(int error, const Page& page,
                                                            const char* what) {
  switch (error) {
    case EEXIST:
      return Install::kExisted;  // installed by someone else first
    case EAGAIN:
      return Install::kAgain;  // an event is queued: drain, then retry
    case ENOENT:               // unregistered (removed) or unmapped
    case ESRCH:                // the VM's memory is gone
      return Install::kNoTarget;
    default:
      log(LogLevel::kError, "serve uffd: {} of page {:#x}: {}", what, page.address,
          posix_error("ioctl", error).to_string());
      return Install::kFailed;
  }
}

void UffdServer::Session::wake_events() {
  const uint64_t one = 1;
  (void)!::write(wake_.get(), &one, sizeof one);
}

UffdServer::UffdServer(image::Disk& memfile, UffdOptions options)
    : memfile_(memfile),
      options_(std::move(options)),
      workers_(options_.shared_workers),
      own_workers_(workers_ == nullptr ? std::make_unique<WorkerPool>(options_.workers) : nullptr) {
  if (workers_ == nullptr) workers_ = own_workers_.get();
}

UffdServer::~UffdServer() {
  stop();
  sessions_.join_all();
}

Status UffdServer::listen_unix(const std::filesystem::path& path) {
  Result<std::unique_ptr<UnixListener>> listener = UnixListener::listen(path);
  if (!listener) return listener.status();
  listener_ = std::move(listener).value();
  wake_fd_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wake_fd_) return posix_error("eventfd", errno);
  return Status::ok();
}

Status UffdServer::serve() {
  if (!listener_) return Status::invalid_argument("serve() before listen");
  // Three descriptors per VM: its socket, its userfaultfd, an eventfd.
  Acceptor acceptor(listener_->fd(), wake_fd_.get(),
                    options_.limits.max_connections > 0 ? options_.limits.max_connections
                                                        : default_max_connections(3),
                    "serve uffd");
  const auto open = [&] { return sessions_.live(); };
  while (!stopping_.load()) {
    Result<UniqueFd> accepted = acceptor.accept(open);
    if (!accepted) return accepted.status();
    if (!*accepted) break;  // stop()
    counters_.connections.fetch_add(1);
    const int socket = accepted->get();
    auto session = std::make_shared<Session>(*this, socket);
    sessions_.start(
        std::move(*accepted), [session](int) { session->run(); }, [session] { session->stop(); });
  }
  sessions_.join_all();
  return Status::ok();
}

void UffdServer::stop() {
  if (stopping_.exchange(true)) return;
  if (wake_fd_) {
    const uint64_t one = 1;
    (void)!::write(wake_fd_.get(), &one, sizeof one);
  }
  sessions_.stop_all();
}

UffdStats UffdServer::stats() const {
  return {counters_.connections.load(),    counters_.faults.load(),
          counters_.served_cached.load(),  counters_.served_zero.load(),
          counters_.served_fetched.load(), counters_.prefetched.load(),
          counters_.removed.load()};
}

}  // namespace lazyblock::uffd
