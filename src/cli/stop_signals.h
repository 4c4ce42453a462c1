// StopSignals: SIGINT and SIGTERM end a long command cleanly (a server's
// serve loop, an upload) instead of killing it where it stands.
#pragma once

#include <signal.h>

#include <atomic>
#include <functional>
#include <thread>

namespace lazyblock::cli {

// Blocked from construction on in this thread and in every thread started
// after (so construct it before the work's threads); taken by a thread of
// its own, which calls the stop function given to on_signal.
class StopSignals {
 public:
  StopSignals();
  ~StopSignals() { stop_waiting(); }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  void on_signal(std::function<void()> stop);
  // Ends the waiter (the stop function is not called after this returns):
  // call it before what the stop function touches goes away.
  void stop_waiting();
  // The signal that arrived, or 0.
  int received() const { return received_.load(); }

 private:
  sigset_t signals_;
  std::atomic<bool> done_{false};
  std::atomic<int> received_{0};
  std::thread waiter_;
};

}  // namespace lazyblock::cli
