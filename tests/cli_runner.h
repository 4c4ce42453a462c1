// Runs the lazyblock binary as a user would, for the integration tests.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "testing/child_process.h"

namespace lazyblock {

struct Outcome {
  int status = -1;  // exit status
  std::string out;
  std::string err;
};

// The whole content of a file ("" if it cannot be read).
std::string slurp(const std::filesystem::path& path);

// Runs the lazyblock binary with `args`, stdout and stderr to files in `dir`,
// stdin from `input` if given (else /dev/null).
Outcome run_lazyblock(const std::filesystem::path& dir, std::vector<std::string> args,
                      const std::filesystem::path& input = {});

// run_lazyblock for a command that must end by itself (a server that is to
// be refused): killed after `seconds` if it has not, so that a regression
// fails the test instead of hanging it (exit status 137 then).
Outcome run_lazyblock_bounded(const std::filesystem::path& dir, std::vector<std::string> args,
                              int seconds = 30);

// `lazyblock ARGS...` started in the background, for a test that interrupts
// or kills a command midway: stdin from /dev/null, stdout and stderr where
// `options` sends them (else /dev/null). Its destruction stops it (SIGTERM)
// if the test has not ended it.
Result<testing::ChildProcess> start_lazyblock(std::vector<std::string> args,
                                              testing::SpawnOptions options = {});

// Runs `program` (found on PATH) with `args` the same way.
Outcome run_program(const std::filesystem::path& dir, const std::string& program,
                    std::vector<std::string> args);

// The lazyblock binary under test (LAZYBLOCK_TEST_BINARY, if set, names
// another build to run the tests against).
std::string lazyblock_binary();

// `lazyblock ARGS...` as a server in a child process (stdout and stderr to
// DIR/server.log), ready once `socket` accepts connections; stopped with
// SIGTERM, as an operator would, and reaped on destruction. `open_files`,
// if not 0, is the child's RLIMIT_NOFILE (soft and hard), as `ulimit -n`
// would set it: for tests of running out of descriptors.
class ServerProcess {
 public:
  ServerProcess(const std::filesystem::path& dir, std::vector<std::string> args,
                std::filesystem::path socket, uint64_t open_files = 0);
  ServerProcess(ServerProcess&& other) noexcept = default;
  ServerProcess& operator=(ServerProcess&&) = delete;

  // False if the process exited before it was ready, or since.
  bool running();
  // SIGTERM, then its exit status (128 + signal if a signal ended it).
  int stop();
  // SIGKILL, as a crash or the OOM killer would end it, then reaped.
  void kill_hard();
  pid_t pid() const { return process_.pid(); }
  const std::filesystem::path& socket() const { return socket_; }

 private:
  std::filesystem::path socket_;
  testing::ChildProcess process_;  // stopped (SIGTERM) on destruction
};

}  // namespace lazyblock
