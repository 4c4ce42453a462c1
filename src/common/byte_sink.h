// ByteSink: where a whole object or device is written in order (a file, a
// pipe, stdout). Used by Chunker::write_to and the export commands.
#pragma once

#include <cstddef>
#include <span>
#include <string>

#include "common/status.h"

namespace lazyblock {

class ByteSink {
 public:
  virtual ~ByteSink() = default;
  // Writes all of `data` or fails. Called from one thread at a time.
  virtual Status write(std::span<const std::byte> data) = 0;
};

// Writes to a file descriptor it does not own, retrying short writes and
// EINTR. `name` names the destination in error messages.
class FdSink final : public ByteSink {
 public:
  FdSink(int fd, std::string name) : fd_(fd), name_(std::move(name)) {}
  Status write(std::span<const std::byte> data) override;

 private:
  const int fd_;
  const std::string name_;
};

}  // namespace lazyblock
