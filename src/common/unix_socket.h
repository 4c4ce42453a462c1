// Listening sockets, as the servers (NBD, UFFD) open them and take connections.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"
#include "common/unique_fd.h"

namespace lazyblock {

// A stream socket listening at a path, mode 0600 so that only this user may
// connect. What is at the path already is replaced only if it is a socket
// nobody answers on (a server that died); a live socket is refused
// ("already in use by another server"), and so is anything that is not a
// socket. When the listener goes, it removes the socket file only if it is
// still its own (the same inode): a later server's socket stays.
class UnixListener {
 public:
  static Result<std::unique_ptr<UnixListener>> listen(const std::filesystem::path& path);
  ~UnixListener();
  UnixListener(const UnixListener&) = delete;
  UnixListener& operator=(const UnixListener&) = delete;

  int fd() const { return fd_.get(); }
  const std::filesystem::path& path() const { return path_; }

 private:
  UnixListener(UniqueFd fd, std::filesystem::path path, dev_t device, ino_t inode)
      : fd_(std::move(fd)), path_(std::move(path)), device_(device), inode_(inode) {}

  UniqueFd fd_;
  const std::filesystem::path path_;
  const dev_t device_;
  const ino_t inode_;
};

// How many connections a server may hold when each costs
// `descriptors_per_connection` descriptors: what RLIMIT_NOFILE leaves after
// a quarter (and 32) is kept for cache files, overlays and the store's own
// sockets. At least 1.
size_t default_max_connections(size_t descriptors_per_connection);

// Acceptor: takes a server's connections off a listening socket, and keeps
// taking them whatever happens, because one misbehaving client must not end
// the service of every VM on the host:
// - out of descriptors (EMFILE, ENFILE) it closes a spare one it keeps for
//   this, accepts the waiting connection and closes it at once (so that the
//   client hears "no" instead of hanging in the backlog) and takes the
//   spare back (without a spare, it pauses briefly); out of memory (ENOMEM,
//   ENOBUFS) it pauses briefly and tries again;
// - past `max_connections` being served, a new one is accepted and closed.
// Each of these is logged, at most once a second (with a count of those not
// logged). Used by one thread at a time.
class Acceptor {
 public:
  // `what` names the server in log lines ("serve nbd").
  Acceptor(int listen_fd, int wake_fd, size_t max_connections, std::string what);

  // Waits for a connection on the listening socket or for `wake_fd` to
  // become readable: the new connection (close-on-exec), or no descriptor
  // once `wake_fd` is readable. `open` is the count of connections being
  // served now. Fails only if poll() does.
  Result<UniqueFd> accept(const std::function<size_t()>& open);

 private:
  // Logs `message` unless one was logged within the last second.
  void log_throttled(const std::string& message);
  // Sleeps a little, or until `wake_fd` is readable (then false).
  bool pause();

  const int listen_fd_;
  const int wake_fd_;
  const size_t max_connections_;
  const std::string what_;
  UniqueFd spare_;  // given up to accept-and-close when out of descriptors
  std::chrono::steady_clock::time_point next_log_{};
  uint64_t not_logged_ = 0;
};

}  // namespace lazyblock
