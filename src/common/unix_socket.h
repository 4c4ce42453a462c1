// Listening sockets, as the servers (NBD, UFFD) open them and take connections.
#pragma once

#include <sys/types.h>

#include <filesystem>
#include <memory>

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

// Waits for a connection on `listen_fd` (any listening socket) or for
// `wake_fd` to become readable: the new connection (close-on-exec), or -1
// once `wake_fd` is readable.
Result<int> accept_or_wake(int listen_fd, int wake_fd);

}  // namespace lazyblock
