// UniqueFd: the owner of one file descriptor, closed when the owner goes.
#pragma once

#include <unistd.h>

#include <utility>

namespace lazyblock {

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(std::exchange(other.fd_, -1));
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  // Closes the descriptor held, if any, and holds `fd` instead. A failing
  // close is not reported: the descriptor is gone either way, and callers
  // that need to know whether data reached the disk sync before.
  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }
  // Closes the descriptor held now and returns close()'s result (0, or -1
  // with errno set), for callers to whom a failing close is an error (a
  // written file whose last data may not have reached the disk).
  int close() { return fd_ >= 0 ? ::close(std::exchange(fd_, -1)) : 0; }
  // Gives the descriptor up without closing it.
  int release() { return std::exchange(fd_, -1); }

 private:
  int fd_ = -1;
};

}  // namespace lazyblock
