#include "cli/stop_signals.h"

#include <pthread.h>

#include "common/log.h"

namespace lazyblock::cli {

StopSignals::StopSignals() {
  sigemptyset(&signals_);
  sigaddset(&signals_, SIGINT);
  sigaddset(&signals_, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals_, nullptr);
}

void StopSignals::on_signal(std::function<void()> stop) {
  waiter_ = std::thread([this, stop = std::move(stop)] {
    int signal = 0;
    sigwait(&signals_, &signal);
    if (!done_.load()) {
      received_.store(signal);
      log(LogLevel::kInfo, "signal {}: stopping", signal);
      stop();
    }
  });
}

void StopSignals::stop_waiting() {
  if (!waiter_.joinable()) return;
  done_.store(true);
  // The work ended some other way: let the waiter go if it still waits.
  pthread_kill(waiter_.native_handle(), SIGTERM);
  waiter_.join();
}

}  // namespace lazyblock::cli
