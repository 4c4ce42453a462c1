// ByteSink: where a whole object or device is written in order (a file, a
// pipe, stdout). Used by Chunker::write_to and the export commands.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "common/status.h"

namespace lazyblock {

class ByteSink {
 public:
  virtual ~ByteSink() = default;
  // Writes all of `data` or fails. Called from one thread at a time.
  virtual Status write(std::span<const std::byte> data) = 0;
  // Writes `count` zero bytes. Sinks that can leave a hole instead (a
  // regular file) do so: an exported disk stays sparse where it reads zeros.
  virtual Status write_zeros(uint64_t count);
};

// Writes to a file descriptor it does not own, retrying short writes and
// EINTR. `name` names the destination in error messages.
class FdSink final : public ByteSink {
 public:
  FdSink(int fd, std::string name);
  Status write(std::span<const std::byte> data) override;
  // On a regular file, extends it past the zeros and seeks there (a hole).
  Status write_zeros(uint64_t count) override;

 private:
  const int fd_;
  const std::string name_;
  const bool regular_file_;
};

}  // namespace lazyblock
