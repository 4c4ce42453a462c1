// Whole reads and writes at an offset of a file descriptor, and where
// temporary files go: the loops every module that keeps a local file needs.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string_view>

#include "common/status.h"

namespace lazyblock {

// Reads into `buffer` from `offset` until it is full or the file ends,
// retrying short reads and EINTR; returns the count read (less than asked
// only at the end of the file). `what` names the file for errors.
Result<size_t> pread_up_to(int fd, std::span<std::byte> buffer, uint64_t offset,
                           std::string_view what);

// Writes all of `data` at `offset`, retrying short writes and EINTR.
Status pwrite_all(int fd, std::span<const std::byte> data, uint64_t offset,
                  std::string_view what);

// Makes the entries of the directory holding `path` durable (a file just
// created or renamed there): fsync of the directory.
Status sync_parent_directory(const std::filesystem::path& path);

// $TMPDIR, or /tmp when it is unset or empty.
std::filesystem::path temp_directory();

}  // namespace lazyblock
