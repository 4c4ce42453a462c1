#include "common/unix_socket.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace lazyblock {

Result<int> listen_unix_socket(const std::filesystem::path& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.string().size() >= sizeof address.sun_path) {
    return Status::invalid_argument("socket path too long: " + path.string());
  }
  std::strcpy(address.sun_path, path.c_str());
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return posix_error("socket", errno);
  ::unlink(path.c_str());
  // The mode comes from the umask at bind time.
  const mode_t old_mask = ::umask(0177);
  const int bound = ::bind(fd, reinterpret_cast<sockaddr*>(&address), sizeof address);
  const int error = errno;
  ::umask(old_mask);
  if (bound != 0) {
    ::close(fd);
    return posix_error("bind " + path.string(), error);
  }
  if (::listen(fd, 64) != 0) {
    const int listen_error = errno;
    ::close(fd);
    return posix_error("listen on " + path.string(), listen_error);
  }
  return fd;
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
