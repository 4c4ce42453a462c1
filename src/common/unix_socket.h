// Listening sockets, as the servers (NBD, UFFD) open them and take connections.
#pragma once

#include <filesystem>

#include "common/status.h"

namespace lazyblock {

// A stream socket listening at `path`, mode 0600 so that only this user may
// connect; a stale socket file there is replaced. The descriptor is the
// caller's to close.
Result<int> listen_unix_socket(const std::filesystem::path& path);

// Waits for a connection on `listen_fd` (any listening socket) or for
// `wake_fd` to become readable: the new connection (close-on-exec), or -1
// once `wake_fd` is readable.
Result<int> accept_or_wake(int listen_fd, int wake_fd);

}  // namespace lazyblock
