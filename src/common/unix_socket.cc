#include "common/unix_socket.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>

namespace lazyblock {
namespace {

// Binds `fd` at `address`, mode 0600 (the mode comes from the umask at bind
// time); the errno of a failure.
int bind_private(int fd, const sockaddr_un& address) {
  const mode_t old_mask = ::umask(0177);
  const int bound = ::bind(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address);
  const int error = errno;
  ::umask(old_mask);
  return bound == 0 ? 0 : error;
}

// Whether a server answers on the socket at `address`.
bool answers(const sockaddr_un& address) {
  const UniqueFd probe(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  return probe &&
         ::connect(probe.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) == 0;
}

}  // namespace

Result<std::unique_ptr<UnixListener>> UnixListener::listen(const std::filesystem::path& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.string().size() >= sizeof address.sun_path) {
    return Status::invalid_argument("socket path too long: " + path.string());
  }
  std::strcpy(address.sun_path, path.c_str());
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return posix_error("socket", errno);
  int error = bind_private(fd.get(), address);
  if (error == EADDRINUSE) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) == 0 && !S_ISSOCK(st.st_mode)) {
      return Status::already_exists(fmt::format(
          "--socket {} exists and is not a socket: not replacing it", path.string()));
    }
    if (answers(address)) {
      return Status::already_exists(fmt::format(
          "socket {} is already in use by another server", path.string()));
    }
    // A socket whose server is gone: ours to replace.
    ::unlink(path.c_str());
    error = bind_private(fd.get(), address);
  }
  if (error != 0) return posix_error("bind " + path.string(), error);
  if (::listen(fd.get(), 128) != 0) return posix_error("listen on " + path.string(), errno);
  struct stat st {};
  if (::lstat(path.c_str(), &st) != 0) return posix_error("stat " + path.string(), errno);
  return std::unique_ptr<UnixListener>(new UnixListener(std::move(fd), path, st.st_dev, st.st_ino));
}

UnixListener::~UnixListener() {
  struct stat st {};
  // Only our own socket: another server may have replaced it since.
  if (::lstat(path_.c_str(), &st) == 0 && st.st_dev == device_ && st.st_ino == inode_) {
    ::unlink(path_.c_str());
  }
}

Result<int> accept_or_wake(int listen_fd, int wake_fd) {
  for (;;) {
    pollfd fds[2] = {{listen_fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return posix_error("poll", errno);
    }
    if (fds[1].revents != 0) return -1;
    if (!(fds[0].revents & POLLIN)) continue;
    const int fd = ::accept4(listen_fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd >= 0) return fd;
    // A client that gave up before we took it, or a signal: wait again.
    if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
      return posix_error("accept", errno);
    }
  }
}

}  // namespace lazyblock
