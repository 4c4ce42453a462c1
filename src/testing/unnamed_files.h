// The unnamed files a process holds (O_TMPFILE, or unlinked after opening):
// how tests reach a running lazyblock's block caches and temporary overlays,
// to cut them short or to see how much they hold.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <vector>

namespace lazyblock::testing {

// The descriptor paths (/proc/PID/fd/N) of the unnamed regular files that
// process `pid` holds, only those in directory `dir` if it is given.
std::vector<std::filesystem::path> unnamed_files_of(pid_t pid,
                                                    const std::filesystem::path& dir = {});

// The one unnamed regular file of `size` bytes that process `pid` holds
// (a block cache's, found by its size), or an empty path if there is none
// or more than one.
std::filesystem::path unnamed_file_of_size(pid_t pid, uint64_t size);

}  // namespace lazyblock::testing
