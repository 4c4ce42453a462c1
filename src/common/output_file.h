// OutputFile: where a command writes a whole stream of bytes (export, cat,
// a page record), without ever destroying what the user had there.
//
// What is at the path decides how it is written:
//   a regular file, or nothing yet  written to an unnamed temporary file in
//       the same directory, synced, then named and renamed into place by
//       commit(): a failed or killed command leaves the old file untouched
//       and no partial file behind. An existing file's mode is kept; a new
//       file gets 0666 less the umask, as cp gives it. On a filesystem
//       without unnamed files (FUSE, some NFS) the temporary file is named
//       .NAME.partial-XXXXXX from the start: a failed command removes it, a
//       killed one leaves it (the old file still untouched).
//   a symlink                       followed: its target is written as above,
//       and the link stays.
//   a block device                  written in place, in order, never
//       unlinked; it must hold the whole stream (expect_size) and is synced
//       by commit().
//   a character device, a FIFO      written in place, in order, never unlinked.
//   a directory, a socket           refused at open().
// A missing or unwritable directory is refused at open(), before any work.
// The path "-" is stdout; "" is stdout too, but refused if stdout is a
// terminal (binary output to a terminal helps nobody: give "-" to insist).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>

#include "common/byte_sink.h"
#include "common/status.h"
#include "common/unique_fd.h"

namespace lazyblock {

class OutputFile {
 public:
  static Result<std::unique_ptr<OutputFile>> open(const std::string& path);
  // Without commit(): a temporary file is dropped, nothing is replaced.
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  // Refuses (kInvalidArgument) a block device smaller than `bytes`; call it
  // once the stream's size is known, before writing.
  Status expect_size(uint64_t bytes) const;

  ByteSink& sink() { return *sink_; }
  // Whether the output is a block device (which must hold the stream).
  bool is_block_device() const { return kind_ == Kind::kDevice; }

  // Makes the written bytes the output: see above. Call once, after the
  // last write.
  Status commit();

  // What the output is, for messages: the path, or "stdout".
  const std::string& name() const { return name_; }

 private:
  enum class Kind { kStdout, kNewFile, kDevice, kStream };
  OutputFile(Kind kind, UniqueFd fd, std::string name, std::filesystem::path target,
             std::filesystem::path named_temp = {});

  const Kind kind_;
  UniqueFd fd_;
  const std::string name_;
  const std::filesystem::path target_;  // kNewFile: the file to replace
  // kNewFile on a filesystem without unnamed files: the temporary file's
  // name, until commit() renames it into place.
  std::filesystem::path named_temp_;
  std::unique_ptr<FdSink> sink_;
};

// The process's umask, read without changing it (umask(2) cannot read
// without writing, which would race with other threads creating files).
mode_t current_umask();

}  // namespace lazyblock
