// nbd::Session: one NBD client's conversation (the fixed-newstyle handshake,
// then the transmission phase) with one Disk, independent of sockets and
// threads: bytes come from and go to a Transport, and each request runs
// where a RequestRunner puts it. NbdServer gives each connection a socket
// transport and its worker pool; the fuzzer gives a session a byte buffer
// and runs requests inline.
//
// Handshake: NBD_OPT_GO/INFO/LIST/ABORT/STRUCTURED_REPLY, EXPORT_NAME for
// old clients, and LIST/SET_META_CONTEXT with base:allocation. Transmission:
// each request (a write's payload read first) is handed to the runner,
// which reads from or writes to the disk and sends the reply under the
// session's write lock, so requests complete out of order as their data
// arrives. BLOCK_STATUS answers from Disk::extents: zero extents (zero
// mappings, trimmed overlay blocks) are NBD_STATE_HOLE | NBD_STATE_ZERO.
//
// Bad input: a request the session cannot satisfy (out of range, too long,
// an unknown command or flag, a write to a read-only export) gets its NBD
// error and the connection goes on; only a request with a wrong magic (the
// stream is out of step) ends it. No length from the wire is trusted to
// allocate beyond the 32 MiB block limit, and a write's payload buffer grows
// only as its bytes arrive.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <span>
#include <string>

#include "common/mutex.h"
#include "image/disk.h"
#include "serve/nbd/protocol.h"
#include "serve/serve_observer.h"

namespace lazyblock::nbd {

struct Export {
  std::string name;   // what clients ask for ("" asks for this one too)
  image::Disk& disk;  // read-only unless disk.writable()
};

// Where one client's bytes come from and go to.
class Transport {
 public:
  virtual ~Transport() = default;
  // Fills `buffer` whole; false if the client went away or ran out of time.
  virtual bool read(std::span<std::byte> buffer) = 0;
  // Sends all of `data`; false if the client is gone. The session makes
  // one call at a time.
  virtual bool write(std::span<const std::byte> data) = 0;
  // The handshake is over: from now on the client may take as long as it likes.
  virtual void handshake_done() {}
};

// How a session's requests run, and what they may hold in memory.
class RequestRunner {
 public:
  virtual ~RequestRunner() = default;
  // Takes `bytes` of the memory budget for one request (a read's reply, a
  // write's payload), waiting while it is spent; false if the server is
  // stopping (the session ends).
  virtual bool admit(uint64_t bytes) = 0;
  virtual void release(uint64_t bytes) = 0;
  // Runs a request, now or on another thread.
  virtual void run(std::function<void()> request) = 0;
};

class Session {
 public:
  // `requests` counts every request read, for the server's statistics;
  // `observer`, if any, is told of every request answered.
  Session(const Export& disk, Transport& transport, RequestRunner& runner,
          std::atomic<uint64_t>& requests, ServeObserver* observer = nullptr);
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  // The handshake, then requests until the client disconnects or the
  // transport fails; returns once every request handed to the runner has
  // sent its reply. Whether the handshake completed.
  bool run();

 private:
  // The handshake: true when transmission starts.
  bool handshake();
  // NBD_OPT_INFO and NBD_OPT_GO: -1 to close, 0 to go on negotiating, 1 to
  // start transmission.
  int info_or_go(uint32_t option, std::span<const std::byte> data);
  // NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT: false to close.
  bool meta_context(uint32_t option, std::span<const std::byte> data);
  void transmission();
  // Reads and drops `length` bytes (a payload the session will not use).
  bool discard(uint64_t length);

  uint16_t transmission_flags() const;
  bool known_export(const std::string& name) const;
  // The error for a request that does not fit the export, or 0.
  uint32_t check(const Request& request) const;
  void handle(const Request& request, std::span<const std::byte> payload);
  void block_status(const Request& request);

  bool send(std::span<const std::byte> data);
  bool send_reply(uint32_t option, uint32_t type, std::span<const std::byte> payload = {});
  bool send_error(uint32_t option, uint32_t type, const std::string& message);
  void finish_read(const Request& request, std::span<const std::byte> data);
  void finish_error(const Request& request, uint32_t error, const std::string& message);

  const Export& export_;
  image::Disk& disk_;
  Transport& transport_;
  RequestRunner& runner_;
  std::atomic<uint64_t>& requests_;
  ServeObserver* const observer_;

  // Set during the handshake, read-only after.
  bool no_zeroes_ = false;
  bool structured_ = false;
  bool allocation_context_ = false;  // base:allocation selected

  Mutex write_mu_;  // one reply at a time on the transport

  Mutex mu_;
  CondVar idle_;
  int in_flight_ GUARDED_BY(mu_) = 0;
};

}  // namespace lazyblock::nbd
