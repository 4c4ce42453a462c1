// SessionRegistry: the connections a server is serving, each on a thread of
// its own that the registry starts and joins (no thread outlives it).
//
// A server hands over each connection it accepts with the function that
// serves it. The registry owns the connection's socket: it closes it when
// the session's function returns, under its lock, so that shutting down
// the live connections (on stop) never meets a descriptor closed and
// reused. Threads of sessions that ended are joined as new sessions start
// and when the server waits for them all. Thread-safe.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <list>
#include <string>
#include <thread>

#include "common/mutex.h"
#include "common/unique_fd.h"

namespace lazyblock {

class SessionRegistry {
 public:
  // `what` names the server in log lines ("serve nbd").
  explicit SessionRegistry(std::string what) : what_(std::move(what)) {}
  // Waits for every session to end and joins its thread.
  ~SessionRegistry() { join_all(); }
  SessionRegistry(const SessionRegistry&) = delete;
  SessionRegistry& operator=(const SessionRegistry&) = delete;

  // Runs `run(socket)` on a thread of its own; `stop`, if given, is how
  // stop_all() asks the session to end (it runs under the registry's lock,
  // never after `run` has returned). False if no thread could be started:
  // the connection is refused (closed) and that is logged.
  bool start(UniqueFd socket, std::function<void(int socket)> run,
             std::function<void()> stop = nullptr);

  // The sessions being served now.
  size_t live() const;
  // shutdown(2) of every live session's socket, `how` being SHUT_RD,
  // SHUT_WR or SHUT_RDWR.
  void shutdown_all(int how);
  // Asks every live session to end (its `stop`, else SHUT_RDWR).
  void stop_all();
  // Waits until no session is live, for up to `timeout`; true if none is.
  bool wait_ended(std::chrono::milliseconds timeout);
  // Waits until no session is live, however long that takes, and joins
  // every session's thread.
  void join_all();

 private:
  struct Session {
    UniqueFd socket;  // closed when the session ends
    std::function<void()> stop;
    bool ended = false;
    std::thread thread;
  };
  // On a session's thread, once `run` returned.
  void ended(std::list<Session>::iterator session);
  // Takes the threads of the sessions that ended out of the list (erasing
  // those sessions), to be joined outside the lock.
  std::list<std::thread> take_ended_locked() REQUIRES(mu_);

  const std::string what_;
  mutable Mutex mu_;
  CondVar changed_;  // a session ended
  std::list<Session> sessions_ GUARDED_BY(mu_);
  size_t live_ GUARDED_BY(mu_) = 0;  // sessions not ended
};

}  // namespace lazyblock
