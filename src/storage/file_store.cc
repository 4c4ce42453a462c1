#include "storage/file_store.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdlib>

#include <fmt/format.h>

namespace lazyblock {
namespace {

// Removes the temporary files of earlier puts of `key` whose processes have
// died (a pack killed while its data file went up): KEY.tmp-PID-N with no
// process PID. A live process's are left alone (its put may be going on).
void remove_dead_temps(int root_fd, const std::string& key) {
  const size_t slash = key.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : key.substr(0, slash);
  const std::string prefix = key.substr(slash + 1) + ".tmp-";
  UniqueFd dir_fd(::openat(root_fd, dir.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!dir_fd) return;
  DIR* listing = ::fdopendir(dir_fd.get());
  if (listing == nullptr) return;
  const int listed_fd = dir_fd.release();  // the listing owns it now
  while (const dirent* entry = ::readdir(listing)) {
    const std::string name = entry->d_name;
    if (name.rfind(prefix, 0) != 0) continue;
    const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
    if (pid > 0 && ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) {
      ::unlinkat(listed_fd, name.c_str(), 0);
    }
  }
  ::closedir(listing);
}

// Refuses keys that could name something outside the root before any system
// call sees them; openat2(RESOLVE_BENEATH) then also refuses symlinks that
// lead out.
Status check_key(const std::string& key) {
  if (key.empty() || key.front() == '/' || key.back() == '/') {
    return Status::invalid_argument(fmt::format("invalid key '{}': must be a relative path", key));
  }
  size_t start = 0;
  while (start <= key.size()) {
    const size_t slash = std::min(key.find('/', start), key.size());
    const std::string_view part(key.data() + start, slash - start);
    if (part.empty() || part == "." || part == "..") {
      return Status::invalid_argument(
          fmt::format("invalid key '{}': empty, '.' and '..' components are not allowed", key));
    }
    start = slash + 1;
  }
  if (key.find('\0') != std::string::npos) {
    return Status::invalid_argument("invalid key: contains a NUL byte");
  }
  return Status::ok();
}

// Opens `path` beneath the directory `dir_fd`, never leaving it.
int open_beneath(int dir_fd, const std::string& path, uint64_t flags, uint64_t mode = 0) {
  open_how how{};
  how.flags = flags | O_CLOEXEC;
  how.mode = mode;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS;
  return static_cast<int>(::syscall(SYS_openat2, dir_fd, path.c_str(), &how, sizeof(how)));
}

Status open_error(const std::string& key, int err) {
  if (err == ENOENT || err == ENOTDIR) return Status::not_found("object not found: " + key);
  if (err == EXDEV) {
    return Status::invalid_argument(fmt::format("invalid key '{}': leads outside the store", key));
  }
  return posix_error("open " + key, err);
}

// The version of the object whose file `st` describes (see file_store.h).
std::string file_version(const struct stat& st) {
  return fmt::format("inode {} mtime {}.{:09}", st.st_ino, st.st_mtim.tv_sec, st.st_mtim.tv_nsec);
}

class FileRangeReader final : public RangeReader {
 public:
  FileRangeReader(UniqueFd fd, std::string key, uint64_t offset, uint64_t length,
                  uint64_t object_size, std::string version)
      : fd_(std::move(fd)),
        key_(std::move(key)),
        position_(offset),
        end_(offset + length),
        length_(length),
        object_size_(object_size),
        version_(std::move(version)) {}

  Result<size_t> read(std::span<std::byte> buffer) override {
    const uint64_t want = std::min<uint64_t>(buffer.size(), end_ - position_);
    if (want == 0) return size_t{0};
    for (;;) {
      const ssize_t n = ::pread(fd_.get(), buffer.data(), want, static_cast<off_t>(position_));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return posix_error(fmt::format("read {} at {}", key_, position_), errno);
      position_ += static_cast<uint64_t>(n);
      return static_cast<size_t>(n);
    }
  }
  uint64_t object_size() const override { return object_size_; }
  std::string object_version() const override { return version_; }
  uint64_t range_length() const override { return length_; }

 private:
  const UniqueFd fd_;
  const std::string key_;
  uint64_t position_;
  const uint64_t end_;
  const uint64_t length_;
  const uint64_t object_size_;
  const std::string version_;
};

}  // namespace

Result<std::shared_ptr<FileStore>> FileStore::open(const std::filesystem::path& root) {
  UniqueFd fd(::open(root.c_str(), O_PATH | O_DIRECTORY | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    if (err == ENOENT || err == ENOTDIR) {
      return Status::not_found(fmt::format("store directory {} does not exist", root.string()));
    }
    return posix_error("open store directory " + root.string(), err);
  }
  std::error_code error;
  std::filesystem::path canonical = std::filesystem::canonical(root, error);
  if (error) canonical = std::filesystem::absolute(root, error);
  return std::shared_ptr<FileStore>(new FileStore(root, std::move(canonical), std::move(fd)));
}

FileStore::FileStore(std::filesystem::path root, std::filesystem::path canonical_root,
                     UniqueFd root_fd)
    : root_(std::move(root)),
      canonical_root_(std::move(canonical_root)),
      root_fd_(std::move(root_fd)) {}

FileStore::~FileStore() = default;

Result<uint64_t> FileStore::stat(const std::string& key, const IoContext& io) {
  Result<ObjectInfo> info = stat_info(key, io);
  if (!info) return info.status();
  return info->size;
}

Result<ObjectInfo> FileStore::stat_info(const std::string& key, const IoContext&) {
  Result<ObjectInfo> info = stat_info_here(key);
  if (!info) return info.status().with_context(describe());
  return info;
}

Result<std::unique_ptr<RangeReader>> FileStore::open_range(const std::string& key, uint64_t offset,
                                                           uint64_t length, const IoContext&) {
  Result<std::unique_ptr<RangeReader>> reader = open_range_here(key, offset, length);
  if (!reader) return reader.status().with_context(describe());
  return reader;
}

Status FileStore::put(const std::string& key, std::span<const std::byte> data, const IoContext&) {
  const Status status = put_here(key, data);
  return status.is_ok() ? status : status.with_context(describe());
}

Status FileStore::remove(const std::string& key, const IoContext&) {
  const Status status = remove_here(key);
  return status.is_ok() ? status : status.with_context(describe());
}

Result<ObjectInfo> FileStore::stat_info_here(const std::string& key) {
  LB_RETURN_IF_ERROR(check_key(key));
  const UniqueFd fd(open_beneath(root_fd_.get(), key, O_PATH));
  if (!fd) return open_error(key, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return posix_error("stat " + key, errno);
  if (!S_ISREG(st.st_mode)) return Status::not_found("object not found: " + key);
  return ObjectInfo{static_cast<uint64_t>(st.st_size), file_version(st)};
}

Result<std::unique_ptr<RangeReader>> FileStore::open_range_here(const std::string& key,
                                                                uint64_t offset, uint64_t length) {
  LB_RETURN_IF_ERROR(check_key(key));
  UniqueFd fd(open_beneath(root_fd_.get(), key, O_RDONLY));
  if (!fd) return open_error(key, errno);
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0 || !S_ISREG(st.st_mode)) {
    return Status::not_found("object not found: " + key);
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (offset > size) {
    return Status::out_of_range(
        fmt::format("range of {} starts at {}, past its end at {}", key, offset, size));
  }
  const uint64_t clipped = std::min(length, size - offset);
  return std::unique_ptr<RangeReader>(
      new FileRangeReader(std::move(fd), key, offset, clipped, size, file_version(st)));
}

Status FileStore::put_here(const std::string& key, std::span<const std::byte> data) {
  LB_RETURN_IF_ERROR(check_key(key));
  // Create the parent directories one by one beneath the root.
  for (size_t slash = key.find('/'); slash != std::string::npos; slash = key.find('/', slash + 1)) {
    const std::string dir = key.substr(0, slash);
    if (::mkdirat(root_fd_.get(), dir.c_str(), 0755) != 0 && errno != EEXIST) {
      return posix_error("create directory " + dir + " in " + root_.string(), errno);
    }
  }
  // Write a temporary file beside the target, then rename it into place.
  static std::atomic<uint64_t> puts{0};
  const std::string temp = fmt::format("{}.tmp-{}-{}", key, ::getpid(), puts.fetch_add(1));
  UniqueFd fd(open_beneath(root_fd_.get(), temp, O_WRONLY | O_CREAT | O_EXCL, 0644));
  if (!fd) return open_error(temp, errno);
  size_t done = 0;
  Status status;
  while (done < data.size()) {
    const ssize_t n = ::write(fd.get(), data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      status = posix_error("write " + key, errno);
      break;
    }
    done += static_cast<size_t>(n);
  }
  if (fd.close() != 0 && status.is_ok()) status = posix_error("close " + key, errno);
  if (status.is_ok() &&
      ::renameat(root_fd_.get(), temp.c_str(), root_fd_.get(), key.c_str()) != 0) {
    status = posix_error("rename into " + key, errno);
  }
  if (!status.is_ok()) ::unlinkat(root_fd_.get(), temp.c_str(), 0);
  if (status.is_ok()) remove_dead_temps(root_fd_.get(), key);
  return status;
}

Status FileStore::remove_here(const std::string& key) {
  LB_RETURN_IF_ERROR(check_key(key));
  if (::unlinkat(root_fd_.get(), key.c_str(), 0) != 0) {
    if (errno == ENOENT) return Status::not_found("object not found: " + key);
    return posix_error("remove " + key, errno);
  }
  return Status::ok();
}

std::string FileStore::describe() const { return "file://" + root_.string(); }

std::string FileStore::location() const { return "file://" + canonical_root_.string(); }

}  // namespace lazyblock
