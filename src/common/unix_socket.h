// Listening Unix sockets, as the servers (NBD, UFFD) open them.
#pragma once

#include <filesystem>

#include "common/status.h"

namespace lazyblock {

// A stream socket listening at `path`, mode 0600 so that only this user may
// connect; a stale socket file there is replaced. The descriptor is the
// caller's to close.
Result<int> listen_unix_socket(const std::filesystem::path& path);

}  // namespace lazyblock
