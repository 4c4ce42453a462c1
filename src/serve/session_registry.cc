#include "serve/session_registry.h"

#include <sys/socket.h>

#include <system_error>

#include "common/log.h"

namespace lazyblock {

bool SessionRegistry::start(UniqueFd socket, std::function<void(int socket)> run,
                            std::function<void()> stop) {
  std::list<std::thread> finished;
  bool started = true;
  {
    MutexLock lock(mu_);
    finished = take_ended_locked();
    const auto session = sessions_.emplace(sessions_.end());
    session->socket = std::move(socket);
    session->stop = std::move(stop);
    // Started under the lock: the thread's ended() waits for it, so the
    // thread is in place before anyone may take it.
    try {
      session->thread = std::thread([this, session, run = std::move(run)] {
        run(session->socket.get());
        ended(session);
      });
      ++live_;
    } catch (const std::system_error& error) {
      // Out of threads: this connection is refused; the server goes on.
      log(LogLevel::kWarn, "{}: refused a connection: no thread for it ({})", what_, error.what());
      sessions_.erase(session);
      started = false;
    }
  }
  for (std::thread& thread : finished) thread.join();
  return started;
}

void SessionRegistry::ended(std::list<Session>::iterator session) {
  MutexLock lock(mu_);
  session->socket.reset();
  session->stop = nullptr;
  session->ended = true;
  --live_;
  changed_.notify_all();
}

std::list<std::thread> SessionRegistry::take_ended_locked() {
  std::list<std::thread> threads;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    if (!it->ended) {
      ++it;
      continue;
    }
    threads.push_back(std::move(it->thread));
    it = sessions_.erase(it);
  }
  return threads;
}

size_t SessionRegistry::live() const {
  MutexLock lock(mu_);
  return live_;
}

void SessionRegistry::shutdown_all(int how) {
  MutexLock lock(mu_);
  for (Session& session : sessions_) {
    if (!session.ended) ::shutdown(session.socket.get(), how);
  }
}

void SessionRegistry::stop_all() {
  MutexLock lock(mu_);
  for (Session& session : sessions_) {
    if (session.ended) continue;
    if (session.stop) {
      session.stop();
    } else {
      ::shutdown(session.socket.get(), SHUT_RDWR);
    }
  }
}

bool SessionRegistry::wait_ended(std::chrono::milliseconds timeout) {
  MutexLock lock(mu_);
  return changed_.wait_for(lock, timeout, [&]() REQUIRES(mu_) { return live_ == 0; });
}

void SessionRegistry::join_all() {
  for (;;) {
    std::list<std::thread> finished;
    {
      MutexLock lock(mu_);
      changed_.wait(lock, [&]() REQUIRES(mu_) { return live_ == 0; });
      if (sessions_.empty()) return;
      finished = take_ended_locked();
    }
    for (std::thread& thread : finished) thread.join();
  }
}

}  // namespace lazyblock
