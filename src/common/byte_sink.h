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
  // Writes `data`, which lies in a file mapping that may fail under the
  // write (a cache file cut short, a disk error: reading it would raise
  // SIGBUS): data.size(), or the count written before the mapping failed
  // (the bytes past it are not written), or the sink's own error. This
  // default copies through a small buffer with guarded_copy; a file
  // descriptor's sink writes straight from the mapping, with no copy of
  // its own (the kernel reports the fault as EFAULT, not SIGBUS).
  virtual Result<size_t> write_from_mapping(std::span<const std::byte> data);
};

// Writes to a file descriptor it does not own, retrying short writes and
// EINTR. `name` names the destination in error messages.
class FdSink final : public ByteSink {
 public:
  FdSink(int fd, std::string name);
  Status write(std::span<const std::byte> data) override;
  // On a regular file, extends it past the zeros and seeks there (a hole).
  Status write_zeros(uint64_t count) override;
  Result<size_t> write_from_mapping(std::span<const std::byte> data) override;

 private:
  const int fd_;
  const std::string name_;
  const bool regular_file_;
};

}  // namespace lazyblock
