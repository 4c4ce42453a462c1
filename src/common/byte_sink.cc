#include "common/byte_sink.h"

#include <unistd.h>

#include <cerrno>

namespace lazyblock {

Status FdSink::write(std::span<const std::byte> data) {
  while (!data.empty()) {
    const ssize_t n = ::write(fd_, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return posix_error("write to " + name_, errno);
    }
    data = data.subspan(static_cast<size_t>(n));
  }
  return Status::ok();
}

}  // namespace lazyblock
