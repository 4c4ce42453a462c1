#include "tests/cli_runner.h"

#include <fcntl.h>
#include <sys/resource.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <thread>

#include "testing/local_port.h"

namespace lazyblock {

std::string slurp(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

namespace {

Outcome run_program_with_input(const std::filesystem::path& dir, std::vector<std::string> args,
                               const std::filesystem::path& input) {
  const std::filesystem::path out = dir / "stdout";
  const std::filesystem::path err = dir / "stderr";
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int out_fd = ::open(out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const int err_fd = ::open(err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
    const int in_fd = ::open(input.empty() ? "/dev/null" : input.c_str(), O_RDONLY);
    ::dup2(in_fd, STDIN_FILENO);
    ::dup2(out_fd, STDOUT_FILENO);
    ::dup2(err_fd, STDERR_FILENO);
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    ::execvp(argv[0], argv.data());
    ::_exit(127);
  }
  int wait_status = 0;
  ::waitpid(pid, &wait_status, 0);
  Outcome run;
  run.status = WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
  run.out = slurp(out);
  run.err = slurp(err);
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

Outcome run_program(const std::filesystem::path& dir, const std::string& program,
                    std::vector<std::string> args) {
  args.insert(args.begin(), program);
  return run_program_with_input(dir, args, {});
}

namespace {

bool accepts(const std::filesystem::path& socket) {
  return testing::connect_unix_socket(socket).valid();
}

}  // namespace

ServerProcess::ServerProcess(const std::filesystem::path& dir, std::vector<std::string> args,
                             std::filesystem::path socket, uint64_t open_files)
    : socket_(std::move(socket)) {
  args.insert(args.begin(), lazyblock_binary());
  const std::string log = (dir / "server.log").string();
  pid_ = ::fork();
  if (pid_ == 0) {
    const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0600);
    ::dup2(out, STDOUT_FILENO);
    ::dup2(out, STDERR_FILENO);
    if (open_files != 0) {
      const rlimit limit{open_files, open_files};
      if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::_exit(126);
    }
    std::vector<char*> argv;
    for (std::string& arg : args) argv.push_back(arg.data());
    argv.push_back(nullptr);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  // Ready once the socket accepts; gone if the process exits first.
  while (!accepts(socket_)) {
    if (!running()) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a real condition
  }
}

ServerProcess::ServerProcess(ServerProcess&& other) noexcept
    : socket_(std::move(other.socket_)), pid_(other.pid_), exit_status_(other.exit_status_) {
  other.pid_ = -1;
}

bool ServerProcess::running() {
  if (pid_ < 0) return false;
  int status = 0;
  if (::waitpid(pid_, &status, WNOHANG) != pid_) return true;
  pid_ = -1;
  exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return false;
}

void ServerProcess::kill_hard() {
  if (pid_ < 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  exit_status_ = 128 + SIGKILL;
}

int ServerProcess::stop() {
  if (pid_ < 0) return exit_status_;
  ::kill(pid_, SIGTERM);
  int status = 0;
  ::waitpid(pid_, &status, 0);
  pid_ = -1;
  exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return exit_status_;
}

}  // namespace lazyblock
