#include "common/file_io.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include <fmt/format.h>

namespace lazyblock {

Result<size_t> pread_up_to(int fd, std::span<std::byte> buffer, uint64_t offset,
                           std::string_view what) {
  size_t done = 0;
  while (done < buffer.size()) {
    const ssize_t got =
        ::pread(fd, buffer.data() + done, buffer.size() - done, static_cast<off_t>(offset + done));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return posix_error(fmt::format("read {}", what), errno);
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return done;
}

Status pwrite_all(int fd, std::span<const std::byte> data, uint64_t offset, std::string_view what) {
  while (!data.empty()) {
    const ssize_t put = ::pwrite(fd, data.data(), data.size(), static_cast<off_t>(offset));
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) {
      return posix_error(fmt::format("write {} bytes to {} at {}", data.size(), what, offset),
                         put < 0 ? errno : EIO);
    }
    offset += static_cast<uint64_t>(put);
    data = data.subspan(static_cast<size_t>(put));
  }
  return Status::ok();
}

Status sync_parent_directory(const std::filesystem::path& path) {
  const std::filesystem::path parent =
      path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
  const UniqueFd fd(::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (!fd) return posix_error(fmt::format("open directory {}", parent.string()), errno);
  if (::fsync(fd.get()) != 0) {
    return posix_error(fmt::format("sync directory {}", parent.string()), errno);
  }
  return Status::ok();
}

std::filesystem::path temp_directory() {
  const char* tmp = std::getenv("TMPDIR");
  return tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
}

bool unnamed_files_unsupported(int error) {
  // EOPNOTSUPP: the file system has no O_TMPFILE; EISDIR, EINVAL: the kernel
  // or the C library does not know the flag.
  return error == EOPNOTSUPP || error == EISDIR || error == EINVAL;
}

Result<UniqueFd> open_unnamed_file(const std::filesystem::path& dir, std::string_view what) {
  UniqueFd fd(::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600));
  if (fd) return fd;
  if (!unnamed_files_unsupported(errno)) {
    return posix_error(fmt::format("create {} in {}", what, dir.string()), errno);
  }
  std::string name = (dir / "lazyblock-tmp-XXXXXX").string();
  fd.reset(::mkostemp(name.data(), O_CLOEXEC));
  if (!fd) return posix_error(fmt::format("create {} in {}", what, dir.string()), errno);
  ::unlink(name.c_str());
  return fd;
}

}  // namespace lazyblock
