#include "common/unix_socket.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "common/log.h"

namespace lazyblock {
namespace {

// After a failed accept, the pause before the next: long enough not to spin,
// short enough that connections resume promptly when descriptors free up.
constexpr std::chrono::milliseconds kAcceptPause{50};

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
      return Status::already_exists(
          fmt::format("--socket {} exists and is not a socket: not replacing it", path.string()));
    }
    if (answers(address)) {
      return Status::already_exists(
          fmt::format("socket {} is already in use by another server", path.string()));
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

size_t default_max_connections(size_t descriptors_per_connection) {
  rlimit limit{};
  if (::getrlimit(RLIMIT_NOFILE, &limit) != 0 || limit.rlim_cur == RLIM_INFINITY) {
    limit.rlim_cur = 1 << 20;
  }
  const uint64_t descriptors = limit.rlim_cur;
  const uint64_t kept = descriptors / 4 + 32;
  if (descriptors <= kept) return 1;
  return std::max<size_t>(1,
                          (descriptors - kept) / std::max<size_t>(1, descriptors_per_connection));
}

Acceptor::Acceptor(int listen_fd, int wake_fd, size_t max_connections, std::string what)
    : listen_fd_(listen_fd),
      wake_fd_(wake_fd),
      max_connections_(max_connections),
      what_(std::move(what)),
      spare_(::open("/dev/null", O_RDONLY | O_CLOEXEC)) {}

void Acceptor::log_throttled(const std::string& message) {
  const auto now = std::chrono::steady_clock::now();
  if (now < next_log_) {
    ++not_logged_;
    return;
  }
  if (not_logged_ > 0) {
    log(LogLevel::kWarn, "{}: {} ({} more like it in the last second)", what_, message,
        not_logged_);
  } else {
    log(LogLevel::kWarn, "{}: {}", what_, message);
  }
  not_logged_ = 0;
  next_log_ = now + std::chrono::seconds(1);
}

bool Acceptor::pause() {
  pollfd wake{wake_fd_, POLLIN, 0};
  return ::poll(&wake, 1, static_cast<int>(kAcceptPause.count())) <= 0 || wake.revents == 0;
}

Result<UniqueFd> Acceptor::accept(const std::function<size_t()>& open) {
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      return posix_error("poll", errno);
    }
    if (fds[1].revents != 0) return UniqueFd();
    if (!(fds[0].revents & POLLIN)) continue;
    UniqueFd fd(::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC));
    if (fd) {
      const size_t served = open();
      if (served < max_connections_) return fd;
      fd.reset();
      log_throttled(
          fmt::format("refused a connection: {} are open, the most allowed "
                      "(--max-connections)",
                      served));
      continue;
    }
    const int error = errno;
    switch (error) {
      case EINTR:
      case EAGAIN:
      case ECONNABORTED:
        continue;  // a client that gave up before we took it, or a signal
      case EMFILE:
      case ENFILE: {
        // The spare makes room to say no to the client waiting first.
        spare_.reset();
        const bool refused =
            UniqueFd(::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC)).valid();
        spare_.reset(::open("/dev/null", O_RDONLY | O_CLOEXEC));
        log_throttled(
            fmt::format("out of file descriptors ({}): refusing connections until "
                        "some end",
                        std::strerror(error)));
        // Refusing one made progress: go on with the next at once. Else
        // (no spare) wait a little rather than spin.
        if (!refused && !pause()) return UniqueFd();
        continue;
      }
      case ENOMEM:
      case ENOBUFS:
      case EPROTO:
      case EPERM:
        log_throttled(fmt::format("accept failed ({}): trying again", std::strerror(error)));
        if (!pause()) return UniqueFd();
        continue;
      default:
        // EBADF, EINVAL, ENOTSOCK: the listening socket itself is wrong.
        return posix_error("accept", error);
    }
  }
}

}  // namespace lazyblock
