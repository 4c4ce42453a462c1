// ConnectionLimits: what one server (NBD, UFFD) lets its clients hold, so
// that no client, however broken or hostile, takes the service of the
// others down.
#pragma once

#include <chrono>
#include <cstddef>

namespace lazyblock {

// A client must have finished its handshake (NBD: NBD_OPT_GO or
// EXPORT_NAME; UFFD: the mappings and the descriptor) this soon after it
// connected, or it is closed.
inline constexpr std::chrono::seconds kHandshakeTimeout{10};

struct ConnectionLimits {
  // Connections served at once; one more is accepted and closed at once.
  // 0: default_max_connections() for the server's descriptors per connection.
  size_t max_connections = 0;
  std::chrono::milliseconds handshake_timeout = kHandshakeTimeout;
};

}  // namespace lazyblock
