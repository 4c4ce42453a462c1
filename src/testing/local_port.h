// Local endpoints of the servers tests start: ports on 127.0.0.1, Unix sockets.
#pragma once

#include <cstdint>
#include <filesystem>

#include "common/status.h"
#include "common/unique_fd.h"

namespace lazyblock::testing {

// A port free right now on 127.0.0.1 (another process may take it before
// the caller binds it: callers retry).
Result<uint16_t> free_port();

// Whether something accepts TCP connections on 127.0.0.1:`port`.
bool accepts_connections(uint16_t port);

// A Unix stream socket connected to `path` (close-on-exec), or no
// descriptor (errno says why).
UniqueFd connect_unix_socket(const std::filesystem::path& path);

}  // namespace lazyblock::testing
