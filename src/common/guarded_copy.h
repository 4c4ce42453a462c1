// guarded_copy: memcpy out of a file mapping that may fail under us.
//
// Reading a MAP_SHARED page whose file has been cut short, or whose disk
// returns an I/O error, raises SIGBUS, which would kill the process and
// every VM it serves. A copy made through guarded_copy instead returns
// false: a SIGBUS handler (installed on first use) jumps back out of the
// copy when the fault happened inside one on this thread. A SIGBUS anywhere
// else goes to the handler that was there before, or kills the process as
// it always would.
#pragma once

#include <cstddef>

namespace lazyblock {

// Copies `length` bytes from `source` (inside a file mapping) to
// `destination`; false if reading the mapping faulted (then `destination`
// holds part of the bytes at most).
bool guarded_copy(void* destination, const void* source, size_t length);

}  // namespace lazyblock
