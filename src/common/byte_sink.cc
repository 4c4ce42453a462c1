#include "common/byte_sink.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>

namespace lazyblock {

Status ByteSink::write_zeros(uint64_t count) {
  static const std::array<std::byte, 64 * 1024> kZeros{};
  while (count > 0) {
    const uint64_t take = std::min<uint64_t>(count, kZeros.size());
    LB_RETURN_IF_ERROR(write(std::span(kZeros).first(take)));
    count -= take;
  }
  return Status::ok();
}

namespace {

bool is_regular_file(int fd) {
  struct stat st {};
  return ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

FdSink::FdSink(int fd, std::string name)
    : fd_(fd), name_(std::move(name)), regular_file_(is_regular_file(fd)) {}

Status FdSink::write_zeros(uint64_t count) {
  if (!regular_file_) return ByteSink::write_zeros(count);
  const off_t position = ::lseek(fd_, 0, SEEK_CUR);
  if (position < 0) return posix_error("seek in " + name_, errno);
  const off_t end = position + static_cast<off_t>(count);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) return posix_error("stat " + name_, errno);
  // Extending the file leaves a hole; bytes already there are not ours to
  // keep (the sink owns the rest of the file), so zero them by extension
  // only when the file ends before `end`.
  if (st.st_size < end && ::ftruncate(fd_, end) != 0) {
    return posix_error("extend " + name_, errno);
  }
  if (st.st_size > position) {
    // Bytes of an older file lie in the way: write real zeros over them.
    const uint64_t overlap =
        std::min<uint64_t>(count, static_cast<uint64_t>(st.st_size - position));
    LB_RETURN_IF_ERROR(ByteSink::write_zeros(overlap));
  }
  if (::lseek(fd_, end, SEEK_SET) < 0) return posix_error("seek in " + name_, errno);
  return Status::ok();
}

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
