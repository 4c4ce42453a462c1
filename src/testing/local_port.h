// Ports on 127.0.0.1 for the servers tests start.
#pragma once

#include <cstdint>

#include "common/status.h"

namespace lazyblock::testing {

// A port free right now on 127.0.0.1 (another process may take it before
// the caller binds it: callers retry).
Result<uint16_t> free_port();

// Whether something accepts TCP connections on 127.0.0.1:`port`.
bool accepts_connections(uint16_t port);

}  // namespace lazyblock::testing
