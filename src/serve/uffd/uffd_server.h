// UffdServer: serves a VM's guest memory from a build's memfile as
// Firecracker's external page-fault handler ("UFFD handler").
//
// Protocol: Firecracker connects to our Unix socket once per VM and sends,
// in one message, the JSON array of its guest memory regions (see
// guest_regions.h) with the userfaultfd it registered them on (SCM_RIGHTS).
// From then on every first touch of a guest page is a missing fault on that
// descriptor, which we resolve by installing the page's bytes: memfile byte
// `region.offset + (page - region.base)` and on.
//
// Data flow, per VM (a Session): one thread reads the descriptor's events.
// It drains every queued event before serving faults (while a REMOVE event
// is queued, installing fails with EAGAIN). A fault whose page is cached, or
// lies in a nil (zero) range of the header, is served at once on that thread
// (UFFDIO_ZEROPAGE, or UFFDIO_COPY from a copy the cache checked: never from
// its map, whose pages read as zeros where its file was cut short); any
// other goes to a worker, which waits for the chunker to fetch the bytes,
// then copies them.
// Several vCPUs' faults are thus fetched concurrently; a page faulted twice
// while in flight is fetched once, and EEXIST (someone installed it first)
// counts as served. A REMOVE event (the balloon, MADV_DONTNEED) unregisters
// its range, so the kernel itself gives zero pages there from now on; a
// fault already queued there is served as a zero page too.
//
// With a page record to prefetch, a Session asks the memfile to fetch the
// recorded pages' ranges in order at connect, and a thread installs each
// page once cached, ahead of the vCPUs; faults go on being served first (a
// fault never waits behind the prefetch queue). With a record path, each
// Session writes the order of its first faults there when its VM ends.
//
// Bad input (unparsable or inconsistent mappings, regions outside the
// memfile, no descriptor, nothing whole within the handshake timeout; a
// connection past the limit is refused at once) ends that connection with a log line naming the
// cause; the server goes on serving others. A fault the store cannot serve is
// logged and retried: the vCPU waits, it never sees wrong bytes.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <set>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"
#include "common/unique_fd.h"
#include "common/unix_socket.h"
#include "common/worker_pool.h"
#include "image/disk.h"
#include "serve/connection_limits.h"
#include "serve/serve_observer.h"
#include "serve/session_registry.h"
#include "serve/uffd/page_record.h"

namespace lazyblock::uffd {

struct UffdOptions {
  // Where each VM's first-fault order is written when it ends (none if empty).
  std::filesystem::path record;
  // Memfile ranges to fetch and install at every connect, in this order.
  std::vector<PageRun> prefetch;
  // Threads that wait on fetches for faults, shared by all VMs.
  int workers = 16;
  // If set, faults wait on this pool (which outlives the server, shared with
  // other servers: the daemon's) instead of `workers` threads of its own.
  WorkerPool* shared_workers = nullptr;
  // VMs served at once, and how soon each must have sent its mappings and
  // descriptor.
  ConnectionLimits limits;
};

// Counters, for tests, benchmarks and logs.
struct UffdStats {
  uint64_t connections = 0;
  uint64_t faults = 0;          // page faults read from descriptors
  uint64_t served_cached = 0;   // served at once from the cache
  uint64_t served_zero = 0;     // served as zero pages
  uint64_t served_fetched = 0;  // served after a fetch
  uint64_t prefetched = 0;      // pages installed ahead of a fault
  uint64_t removed = 0;         // REMOVE events
};

class UffdServer {
 public:
  UffdServer(image::Disk& memfile, UffdOptions options);
  // Stops serving and waits for every session to end.
  ~UffdServer();

  // Listens on a Unix socket at `path` (mode 0600; see UnixListener for what
  // may be there already).
  Status listen_unix(const std::filesystem::path& path);
  // Accepts and serves VMs until stop(); returns once every session ended.
  Status serve();
  // Ends serve(): no new connections; sessions stop serving. Thread-safe.
  void stop();

  UffdStats stats() const;
  // Tells `observer` (which outlives the server) of every fault resolved.
  // Call before serve().
  void set_observer(ServeObserver* observer) { observer_ = observer; }

 private:
  class Session;
  friend class Session;

  image::Disk& memfile_;
  const UffdOptions options_;
  std::unique_ptr<UnixListener> listener_;
  UniqueFd wake_fd_;  // an eventfd that wakes serve() for stop()
  std::atomic<bool> stopping_{false};

  struct Counters {
    std::atomic<uint64_t> connections{0}, faults{0}, served_cached{0}, served_zero{0},
        served_fetched{0}, prefetched{0}, removed{0};
  };
  Counters counters_;
  ServeObserver* observer_ = nullptr;

  SessionRegistry sessions_{"serve uffd"};  // the VMs being served
  // The pool faults wait on: `own_workers_`, or options_.shared_workers.
  // Each session waits for its tasks before it ends, so a shared pool never
  // runs one of this server's tasks after the server is gone.
  WorkerPool* workers_;
  std::unique_ptr<WorkerPool> own_workers_;  // declared last: destroyed (joined) first
};

}  // namespace lazyblock::uffd
