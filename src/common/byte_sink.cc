#include "common/byte_sink.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>

#include "common/guarded_copy.h"

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
// The unit in which a mapping fails.
constexpr size_t kPage = 4096;
}  // namespace

Result<size_t> ByteSink::write_from_mapping(std::span<const std::byte> data) {
  std::array<std::byte, 64 * 1024> bounce;
  size_t done = 0;
  while (done < data.size()) {
    size_t take = std::min(bounce.size(), data.size() - done);
    if (!guarded_copy(bounce.data(), data.data() + done, take)) {
      // The piece holds the failing page: what comes before it, a page at
      // a time, is still written.
      size_t copied = 0;
      while (copied < take) {
        const size_t page = std::min(kPage, take - copied);
        if (!guarded_copy(bounce.data() + copied, data.data() + done + copied, page)) break;
        copied += page;
      }
      if (copied > 0) LB_RETURN_IF_ERROR(write(std::span(bounce).first(copied)));
      return done + copied;
    }
    LB_RETURN_IF_ERROR(write(std::span(bounce).first(take)));
    done += take;
  }
  return done;
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

Result<size_t> FdSink::write_from_mapping(std::span<const std::byte> data) {
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = ::write(fd_, data.data() + done, data.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      // The kernel met a page of the mapping it could not read (after
      // writing the bytes before it, as a short count).
      if (errno == EFAULT) return done;
      return posix_error("write to " + name_, errno);
    }
    done += static_cast<size_t>(n);
  }
  return done;
}

}  // namespace lazyblock
