// Whole reads and writes at an offset of a file descriptor, and where
// temporary files go: the loops every module that keeps a local file needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>

#include "common/status.h"
#include "common/unique_fd.h"

namespace lazyblock {

// Reads into `buffer` from `offset` until it is full or the file ends,
// retrying short reads and EINTR; returns the count read (less than asked
// only at the end of the file). `what` names the file for errors.
Result<size_t> pread_up_to(int fd, std::span<std::byte> buffer, uint64_t offset,
                           std::string_view what);

// Writes all of `data` at `offset`, retrying short writes and EINTR.
Status pwrite_all(int fd, std::span<const std::byte> data, uint64_t offset, std::string_view what);

// Makes the entries of the directory holding `path` durable (a file just
// created or renamed there): fsync of the directory.
Status sync_parent_directory(const std::filesystem::path& path);

// $TMPDIR, or /tmp when it is unset or empty.
std::filesystem::path temp_directory();

// A new unnamed file in `dir`, open for reading and writing (close-on-exec)
// and gone with its last descriptor: O_TMPFILE where the file system has it,
// else a named file unlinked at once (tmpfs of old kernels, some network and
// FUSE file systems). `what` names the file in errors ("cache file").
Result<UniqueFd> open_unnamed_file(const std::filesystem::path& dir, std::string_view what);

// Whether an open(O_TMPFILE) that failed with `error` failed because
// unnamed files cannot be had there (then a named file must stand in), not
// because of the directory.
bool unnamed_files_unsupported(int error);

}  // namespace lazyblock
