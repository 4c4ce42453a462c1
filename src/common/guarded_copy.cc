#include "common/guarded_copy.h"

#include <pthread.h>
#include <setjmp.h>
#include <signal.h>

#include <atomic>
#include <cstring>
#include <mutex>

namespace lazyblock {
namespace {

// Set while this thread copies under guard: where the handler jumps to.
// Volatile, with signal fences around the copy: the compiler must neither
// drop these stores nor move the copy's reads out from between them.
thread_local sigjmp_buf* volatile active_guard = nullptr;
struct sigaction previous_action {};

void on_sigbus(int signal, siginfo_t* info, void* context) {
  if (sigjmp_buf* guard = active_guard) {
    active_guard = nullptr;
    siglongjmp(*guard, 1);
  }
  // Not a guarded copy's fault: as if this handler were not there.
  if ((previous_action.sa_flags & SA_SIGINFO) != 0 && previous_action.sa_sigaction != nullptr) {
    previous_action.sa_sigaction(signal, info, context);
    return;
  }
  if (previous_action.sa_handler != SIG_DFL && previous_action.sa_handler != SIG_IGN) {
    previous_action.sa_handler(signal);
    return;
  }
  // Returning re-runs the faulting access, which now gets the default
  // action: the process dies of SIGBUS, with its core, as before.
  struct sigaction fallback {};
  fallback.sa_handler = SIG_DFL;
  sigemptyset(&fallback.sa_mask);
  ::sigaction(SIGBUS, &fallback, nullptr);
}

void install_handler() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action {};
    action.sa_sigaction = on_sigbus;
    action.sa_flags = SA_SIGINFO;
    sigemptyset(&action.sa_mask);
    ::sigaction(SIGBUS, &action, &previous_action);
  });
}

}  // namespace

bool guarded_copy(void* destination, const void* source, size_t length) {
  install_handler();
  sigjmp_buf guard;
  // The signal mask is not saved (that would cost a system call per copy,
  // most of a cached read's time): after a jump out of the handler, SIGBUS,
  // which the kernel blocked for the handler, is unblocked here instead.
  if (sigsetjmp(guard, 0) != 0) {
    sigset_t bus;
    sigemptyset(&bus);
    sigaddset(&bus, SIGBUS);
    pthread_sigmask(SIG_UNBLOCK, &bus, nullptr);
    return false;
  }
  active_guard = &guard;
  std::atomic_signal_fence(std::memory_order_seq_cst);
  std::memcpy(destination, source, length);
  std::atomic_signal_fence(std::memory_order_seq_cst);
  active_guard = nullptr;
  return true;
}

}  // namespace lazyblock
