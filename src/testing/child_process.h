// ChildProcess: a program (or a function) run in a child process by a test
// or a benchmark, as a user or a VM would run it beside the code under test:
// started, waited for until it is ready (it listens on its port or socket),
// and stopped on destruction (SIGTERM, then SIGKILL if it has not exited
// within a bound), always reaped.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "common/status.h"

namespace lazyblock::testing {

// How long stop() waits after SIGTERM before it sends SIGKILL: far longer
// than any of our servers takes to end (even under the sanitizers), so that
// only a hang meets it, and it fails the test instead of hanging it.
inline constexpr std::chrono::seconds kStopGrace{60};

struct SpawnOptions {
  // Where stdin comes from and stdout and stderr go (each left as this
  // process's own if empty). Output files are created, truncated unless
  // `append`; stdout and stderr at the same path share one descriptor.
  std::filesystem::path stdin_from;
  std::filesystem::path stdout_to;
  std::filesystem::path stderr_to;
  bool append = false;
  // argv[0] is looked up on PATH (else it is the program's path).
  bool search_path = false;
  // The child leads a process group of its own, and signals go to the whole
  // group (a server with worker processes of its own).
  bool own_process_group = false;
  // If not 0, the child's RLIMIT_NOFILE (soft and hard), as `ulimit -n`
  // would set it; the child exits with 126 if it cannot be set.
  uint64_t open_files = 0;
};

class ChildProcess {
 public:
  // Runs `argv` in a child process (exit status 127 if it cannot be run).
  static Result<ChildProcess> spawn(std::vector<std::string> argv,
                                    const SpawnOptions& options = {});
  // Runs `body` in a forked child; what it returns is the child's exit
  // status. The child never returns to the caller's code.
  static Result<ChildProcess> fork(const std::function<int()>& body);

  ChildProcess() = default;
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&& other) noexcept;
  ChildProcess(const ChildProcess&) = delete;
  ChildProcess& operator=(const ChildProcess&) = delete;
  ~ChildProcess() { stop(); }

  // The child's id, or -1 once it has been reaped.
  pid_t pid() const { return pid_; }
  // False once the child has exited (it is reaped then).
  bool running();
  // Polls `ready` (a real condition, every few milliseconds) until it holds:
  // true then; false if the child exits first or `timeout` passes.
  bool wait_until(const std::function<bool()>& ready, std::chrono::milliseconds timeout);
  // Waits for the child to exit by itself.
  int wait();
  // SIGTERM, as an operator would stop it; SIGKILL if it has not exited
  // within `grace`. Its exit status either way.
  int stop(std::chrono::milliseconds grace = kStopGrace);
  // SIGKILL, as a crash or the OOM killer would end it, then reaped.
  int kill_hard();
  // Sends signal `number` (SIGINT, as a user's ^C) to the child, or to its
  // process group; nothing once it has been reaped.
  void signal(int number) const;
  // The exit status (128 + signal if a signal ended it) once reaped, else -1.
  int exit_status() const { return exit_status_; }

 private:
  ChildProcess(pid_t pid, bool group) : pid_(pid), group_(group) {}
  // waitpid with `flags`; true if the child was reaped.
  bool reap(int flags);

  pid_t pid_ = -1;
  bool group_ = false;
  int exit_status_ = -1;
};

// Readiness checks for wait_until: something accepts connections on
// 127.0.0.1:`port`, or on the Unix socket at `socket`.
std::function<bool()> listens_on(uint16_t port);
std::function<bool()> listens_on(const std::filesystem::path& socket);

}  // namespace lazyblock::testing
