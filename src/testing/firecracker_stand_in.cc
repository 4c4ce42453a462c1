#include "testing/firecracker_stand_in.h"

#include <fcntl.h>
#include <linux/mman.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>

#include <fmt/format.h>

#include "testing/local_port.h"

namespace lazyblock::testing {
namespace {

constexpr uint64_t kHugePage = 2 * 1024 * 1024;

}  // namespace

Status send_with_descriptor(int socket, std::string_view body, int fd) {
  iovec io{const_cast<char*>(body.data()), body.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr message{};
  message.msg_iov = &io;
  message.msg_iovlen = 1;
  if (fd >= 0) {
    message.msg_control = control;
    message.msg_controllen = sizeof control;
    cmsghdr* c = CMSG_FIRSTHDR(&message);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(c), &fd, sizeof fd);
  }
  if (::sendmsg(socket, &message, MSG_NOSIGNAL) != static_cast<ssize_t>(body.size())) {
    return posix_error("sending the mappings", errno);
  }
  return Status::ok();
}

Result<std::unique_ptr<FirecrackerStandIn>> FirecrackerStandIn::restore(
    const std::filesystem::path& socket, const std::vector<StandInRegion>& regions) {
  std::unique_ptr<FirecrackerStandIn> vm(new FirecrackerStandIn);
  bool any_huge = false;
  for (const StandInRegion& region : regions) {
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE;
    if (region.huge) flags |= MAP_HUGETLB | MAP_HUGE_2MB;
    Result<MappedRegion> map =
        MappedRegion::map(region.size, PROT_READ | PROT_WRITE, flags, -1, 0, "guest memory");
    if (!map) return map.status();
    vm->maps_.push_back(std::move(*map));
    any_huge |= region.huge;
  }
  vm->uffd_.reset(static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK)));
  if (!vm->uffd_) return posix_error("userfaultfd", errno);
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = UFFD_FEATURE_EVENT_REMOVE | (any_huge ? UFFD_FEATURE_MISSING_HUGETLBFS : 0);
  if (::ioctl(vm->uffd_.get(), UFFDIO_API, &api) != 0) return posix_error("UFFDIO_API", errno);
  std::string json = "[";
  for (size_t i = 0; i < regions.size(); ++i) {
    uffdio_register registration{};
    registration.range = {reinterpret_cast<uint64_t>(vm->maps_[i].data()), regions[i].size};
    registration.mode = UFFDIO_REGISTER_MODE_MISSING;
    if (::ioctl(vm->uffd_.get(), UFFDIO_REGISTER, &registration) != 0) {
      return posix_error("UFFDIO_REGISTER", errno);
    }
    const uint64_t page_size = regions[i].huge ? kHugePage : 4096;
    // As Firecracker writes it: page_size_kib holds bytes too.
    json += fmt::format(
        "{}{{\"base_host_virt_addr\":{},\"size\":{},\"offset\":{},\"page_size\":{},"
        "\"page_size_kib\":{}}}",
        i == 0 ? "" : ",", reinterpret_cast<uint64_t>(vm->maps_[i].data()), regions[i].size,
        regions[i].offset, page_size, page_size);
  }
  json += "]";
  vm->mappings_ = json;
  vm->socket_ = connect_unix_socket(socket);
  if (!vm->socket_) return posix_error("connecting to " + socket.string(), errno);
  LB_RETURN_IF_ERROR(send_with_descriptor(vm->socket_.get(), json, vm->uffd_.get()));
  return vm;
}

// Members go in reverse order: the socket and the userfaultfd close before
// the memory is unmapped.
FirecrackerStandIn::~FirecrackerStandIn() = default;

void FirecrackerStandIn::close_userfaultfd() { uffd_.reset(); }

Status FirecrackerStandIn::remove(size_t region, uint64_t offset, uint64_t length) {
  if (::madvise(maps_[region].data() + offset, length, MADV_DONTNEED) != 0) {
    return posix_error("madvise(MADV_DONTNEED)", errno);
  }
  return Status::ok();
}

bool reserve_huge_pages(int pages) {
  const char* const pool = "/proc/sys/vm/nr_hugepages";
  int reserved = 0;
  std::ifstream(pool) >> reserved;
  if (reserved < pages) std::ofstream(pool) << pages;
  // Whether they can really be had: map and touch them.
  const size_t length = static_cast<size_t>(pages) * kHugePage;
  return MappedRegion::map(length, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_HUGE_2MB | MAP_POPULATE,
                           -1, 0, "huge pages")
      .is_ok();
}

}  // namespace lazyblock::testing
