#include "tests/cli_runner.h"

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iterator>

namespace lazyblock {

std::string slurp(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

namespace {

Outcome run_program_with_input(const std::filesystem::path& dir, std::vector<std::string> args,
                               const std::filesystem::path& input) {
  testing::SpawnOptions options;
  options.stdin_from = input.empty() ? std::filesystem::path("/dev/null") : input;
  options.stdout_to = dir / "stdout";
  options.stderr_to = dir / "stderr";
  options.search_path = true;
  Outcome run;
  Result<testing::ChildProcess> child = testing::ChildProcess::spawn(std::move(args), options);
  if (!child) {
    run.err = child.status().to_string();
    return run;
  }
  run.status = child->wait();
  run.out = slurp(options.stdout_to);
  run.err = slurp(options.stderr_to);
  return run;
}

}  // namespace

// LAZYBLOCK_TEST_BINARY runs the tests against another build of the command
// (an older one, to show that a test fails there).
std::string lazyblock_binary() {
  const char* other = std::getenv("LAZYBLOCK_TEST_BINARY");
  return other != nullptr && *other != '\0' ? other : LAZYBLOCK_BINARY;
}

Outcome run_lazyblock(const std::filesystem::path& dir, std::vector<std::string> args,
                      const std::filesystem::path& input) {
  args.insert(args.begin(), lazyblock_binary());
  return run_program_with_input(dir, args, input);
}

Outcome run_lazyblock_bounded(const std::filesystem::path& dir, std::vector<std::string> args,
                              int seconds) {
  args.insert(args.begin(), {"timeout", "-s", "KILL", std::to_string(seconds), lazyblock_binary()});
  return run_program_with_input(dir, args, {});
}

Result<testing::ChildProcess> start_lazyblock(std::vector<std::string> args,
                                              testing::SpawnOptions options) {
  args.insert(args.begin(), lazyblock_binary());
  options.stdin_from = "/dev/null";
  if (options.stdout_to.empty()) options.stdout_to = "/dev/null";
  if (options.stderr_to.empty()) options.stderr_to = "/dev/null";
  return testing::ChildProcess::spawn(std::move(args), options);
}

Outcome run_program(const std::filesystem::path& dir, const std::string& program,
                    std::vector<std::string> args) {
  args.insert(args.begin(), program);
  return run_program_with_input(dir, args, {});
}

// Long enough for a server under the sanitizers to come up: only a server
// that never listens meets it.
constexpr std::chrono::seconds kReadyBound{120};

ServerProcess::ServerProcess(const std::filesystem::path& dir, std::vector<std::string> args,
                             std::filesystem::path socket, uint64_t open_files)
    : socket_(std::move(socket)) {
  args.insert(args.begin(), lazyblock_binary());
  testing::SpawnOptions options;
  options.stdout_to = dir / "server.log";
  options.stderr_to = options.stdout_to;
  options.append = true;
  options.open_files = open_files;
  Result<testing::ChildProcess> child = testing::ChildProcess::spawn(std::move(args), options);
  if (!child) return;
  process_ = std::move(*child);
  // Ready once the socket accepts; gone if the process exits first.
  process_.wait_until(testing::listens_on(socket_), kReadyBound);
}

bool ServerProcess::running() { return process_.running(); }

void ServerProcess::kill_hard() { process_.kill_hard(); }

int ServerProcess::stop() { return process_.stop(); }

}  // namespace lazyblock
