// NbdServer: serves one build's disk over NBD (fixed newstyle) to any
// standard client: the Linux kernel's nbd.ko, qemu, libnbd's tools.
//
// Data flow: each connection runs on a thread of its own a Session
// (session.h: the handshake and the requests, the protocol itself) over
// the socket; its requests run on the server's worker pool, which reads
// from or writes to the export's Disk and sends each reply as its data
// arrives. A writable Disk (an Overlay) takes writes, trims and zeroes; the
// stored objects are never modified. A client that vanishes mid-request
// ends only its own connection. A connection holds at most
// 64 MiB of replies and write payloads at once, all of them 256 MiB (and a
// connection holding nothing may always have one request of up to 1 MiB):
// past that its requests are not read until replies are sent. A client that has not finished
// its handshake within the limit's timeout is closed; past the limit's
// connection count, connections are refused (see Acceptor).
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <mutex>
#include <set>
#include <string>

#include "common/mutex.h"
#include "common/status.h"
#include "common/unique_fd.h"
#include "common/unix_socket.h"
#include "common/worker_pool.h"
#include "serve/connection_limits.h"
#include "serve/nbd/session.h"
#include "serve/session_registry.h"

namespace lazyblock::nbd {

class NbdServer {
 public:
  NbdServer(Export disk, ConnectionLimits limits = {}, int workers = 16);
  // Runs its requests on `workers` (which outlives the server), shared with
  // other servers, instead of threads of its own: the daemon's devices all
  // use one pool.
  NbdServer(Export disk, ConnectionLimits limits, WorkerPool& workers);
  // Stops serving and waits for the connections to end.
  ~NbdServer();

  // Listens on a Unix socket at `path` (mode 0600; see UnixListener for
  // what may be there already), or on TCP `host`:`port` (0: any free port;
  // `host` an IPv4 or IPv6 address or a name such as localhost).
  Status listen_unix(const std::filesystem::path& path);
  Status listen_tcp(const std::string& host, uint16_t port);
  uint16_t port() const { return port_; }

  // Accepts and serves connections until stop(); returns once every
  // connection has ended.
  Status serve();
  // Ends serve(): no new connections and no new requests; replies in flight
  // are sent for up to half a second, then every connection is shut down.
  // Requests waiting on fetches wait on: cancel those (DataFiles::cancel)
  // for a prompt end. Thread-safe.
  void stop();

  // Tells `observer` (which outlives the server) of every request
  // answered. Call before serve().
  void set_observer(ServeObserver* observer) { observer_ = observer; }

  // Counters, for tests and logs.
  uint64_t connections() const { return connections_.load(); }
  uint64_t requests() const { return requests_.load(); }

 private:
  // Both public constructors end here; `workers` is null until the
  // first one has made its own pool.
  NbdServer(Export disk, ConnectionLimits limits, WorkerPool* workers);

  class Runner;
  friend class Runner;

  // A connection's thread: its session.
  void serve_connection(int fd);
  // Takes `bytes` of the reply budget for a request of `session` (whose
  // share is `*held`), waiting while that connection holds its share or all
  // of them the whole budget; false once the server stops.
  bool reserve(uint64_t* held, uint64_t bytes);
  void release(uint64_t* held, uint64_t bytes);

  const Export export_;
  const ConnectionLimits limits_;
  std::unique_ptr<UnixListener> unix_listener_;  // listen_unix
  UniqueFd tcp_listener_;                        // listen_tcp
  int listen_fd_ = -1;                           // whichever of the two
  UniqueFd wake_read_, wake_write_;              // a pipe that wakes serve() for stop()
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> connections_{0};
  std::atomic<uint64_t> requests_{0};
  ServeObserver* observer_ = nullptr;

  // The bytes of replies (and write payloads) held in memory, by every
  // connection: bounded, so that clients that send reads without reading
  // the replies cannot make the server hold more.
  Mutex budget_mu_;
  CondVar budget_freed_;
  uint64_t bytes_in_flight_ GUARDED_BY(budget_mu_) = 0;

  SessionRegistry sessions_{"serve nbd"};  // the connections being served

  // The pool requests run on: `own_workers_`, or one shared. Each session
  // waits for its requests before it ends, so a shared pool never runs one
  // of this server's tasks after the server is gone.
  WorkerPool* workers_;
  std::unique_ptr<WorkerPool> own_workers_;  // declared last: destroyed (joined) first
};

}  // namespace lazyblock::nbd
