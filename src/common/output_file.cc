#include "common/output_file.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <random>

#include <fmt/format.h>

#include "common/file_io.h"

namespace lazyblock {
namespace {

// Follows `path` through symlinks (dangling ones included) to the file that
// is to be written; at most 40 links, as the kernel allows.
Result<std::filesystem::path> follow_links(std::filesystem::path path) {
  for (int hops = 0; hops < 40; ++hops) {
    std::error_code error;
    const std::filesystem::file_status status = std::filesystem::symlink_status(path, error);
    if (error || status.type() != std::filesystem::file_type::symlink) return path;
    const std::filesystem::path target = std::filesystem::read_symlink(path, error);
    if (error)
      return Status::io_error(fmt::format("read link {}: {}", path.string(), error.message()));
    path = target.is_absolute() ? target : path.parent_path() / target;
  }
  return Status::invalid_argument(
      fmt::format("{}: too many levels of symbolic links", path.string()));
}

std::filesystem::path directory_of(const std::filesystem::path& path) {
  return path.parent_path().empty() ? std::filesystem::path(".") : path.parent_path();
}

// The name, without its unique tail, of the temporary file beside `target`
// that becomes it: hidden, and saying what it is.
std::string partial_name(const std::filesystem::path& target) {
  return (directory_of(target) / fmt::format(".{}.partial", target.filename().string())).string();
}

}  // namespace

mode_t current_umask() {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line)) {
    if (line.rfind("Umask:", 0) == 0)
      return static_cast<mode_t>(std::stoul(line.substr(6), nullptr, 8));
  }
  return 022;  // the usual one, where /proc does not say
}

Result<std::unique_ptr<OutputFile>> OutputFile::open(const std::string& path) {
  if (path.empty() || path == "-") {
    if (path.empty() && ::isatty(STDOUT_FILENO) == 1) {
      return Status::invalid_argument(
          "refusing to write binary data to a terminal: give -o FILE, or -o - to insist");
    }
    return std::unique_ptr<OutputFile>(new OutputFile(Kind::kStdout, UniqueFd(), "stdout", {}));
  }
  Result<std::filesystem::path> followed = follow_links(path);
  if (!followed) return followed.status();
  const std::filesystem::path target = *followed;
  struct stat st {};
  if (::stat(target.c_str(), &st) == 0) {
    if (S_ISDIR(st.st_mode)) {
      return Status::invalid_argument(fmt::format("-o {}: is a directory", path));
    }
    if (S_ISBLK(st.st_mode) || S_ISCHR(st.st_mode) || S_ISFIFO(st.st_mode)) {
      // Written in place, in order: a device or a pipe is never replaced.
      UniqueFd fd(::open(target.c_str(), O_WRONLY | O_CLOEXEC));
      if (!fd) return posix_error("open " + path, errno);
      return std::unique_ptr<OutputFile>(new OutputFile(
          S_ISBLK(st.st_mode) ? Kind::kDevice : Kind::kStream, std::move(fd), path, target));
    }
    if (!S_ISREG(st.st_mode)) {
      return Status::invalid_argument(fmt::format("-o {}: neither a file nor a device", path));
    }
  } else if (errno != ENOENT) {
    return posix_error("look at " + path, errno);
  }
  const std::filesystem::path dir = directory_of(target);
  const mode_t mode = S_ISREG(st.st_mode) ? (st.st_mode & 07777) : (0666 & ~current_umask());
  UniqueFd fd(::open(dir.c_str(), O_TMPFILE | O_WRONLY | O_CLOEXEC, 0600));
  std::filesystem::path named_temp;
  // Where unnamed files cannot be had (FUSE, some NFS), a named temporary
  // file beside the target stands in.
  if (!fd && unnamed_files_unsupported(errno)) {
    std::string name = partial_name(target) + "-XXXXXX";
    fd.reset(::mkostemp(name.data(), O_CLOEXEC));
    if (fd) named_temp = name;
  }
  if (!fd) {
    if (errno == ENOENT || errno == ENOTDIR) {
      return Status::invalid_argument(
          fmt::format("-o {}: the directory {} does not exist", path, dir.string()));
    }
    return posix_error(fmt::format("create a file in {} for {}", dir.string(), path), errno);
  }
  auto output = std::unique_ptr<OutputFile>(
      new OutputFile(Kind::kNewFile, std::move(fd), path, target, std::move(named_temp)));
  if (::fchmod(output->fd_.get(), mode) != 0) {
    return posix_error("set the mode of " + path, errno);
  }
  return output;
}

OutputFile::OutputFile(Kind kind, UniqueFd fd, std::string name, std::filesystem::path target,
                       std::filesystem::path named_temp)
    : kind_(kind),
      fd_(std::move(fd)),
      name_(std::move(name)),
      target_(std::move(target)),
      named_temp_(std::move(named_temp)) {
  sink_ = std::make_unique<FdSink>(kind_ == Kind::kStdout ? STDOUT_FILENO : fd_.get(), name_);
}

// An unnamed file that is never linked vanishes with its descriptor; a
// named one is unlinked (unless commit() renamed it into place).
OutputFile::~OutputFile() {
  if (!named_temp_.empty()) ::unlink(named_temp_.c_str());
}

Status OutputFile::expect_size(uint64_t bytes) const {
  if (kind_ != Kind::kDevice) return Status::ok();
  uint64_t capacity = 0;
  if (::ioctl(fd_.get(), BLKGETSIZE64, &capacity) != 0) {
    return posix_error("size of device " + name_, errno);
  }
  if (capacity < bytes) {
    return Status::invalid_argument(
        fmt::format("-o {}: the device holds {} bytes, the image is {}: nothing written", name_,
                    capacity, bytes));
  }
  return Status::ok();
}

Status OutputFile::commit() {
  switch (kind_) {
    case Kind::kStdout:
    case Kind::kStream:
      return Status::ok();
    case Kind::kDevice:
      if (::fsync(fd_.get()) != 0) return posix_error("flush " + name_, errno);
      return Status::ok();
    case Kind::kNewFile:
      break;
  }
  if (::fsync(fd_.get()) != 0) return posix_error("flush " + name_, errno);
  std::filesystem::path temp = named_temp_;
  if (temp.empty()) {
    // Named beside the target (linkat cannot replace), then renamed over it.
    std::mt19937_64 rng{std::random_device{}()};
    temp = fmt::format("{}-{:016x}", partial_name(target_), rng());
    const std::string self = fmt::format("/proc/self/fd/{}", fd_.get());
    if (::linkat(AT_FDCWD, self.c_str(), AT_FDCWD, temp.c_str(), AT_SYMLINK_FOLLOW) != 0) {
      return posix_error("name the new " + name_, errno);
    }
  }
  if (::rename(temp.c_str(), target_.c_str()) != 0) {
    const Status failed = posix_error("rename into " + name_, errno);
    ::unlink(temp.c_str());
    named_temp_.clear();
    return failed;
  }
  named_temp_.clear();  // it is the target now
  return sync_parent_directory(target_);
}

}  // namespace lazyblock
