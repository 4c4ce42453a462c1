#include "testing/child_process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <thread>
#include <utility>

#include "testing/local_port.h"

namespace lazyblock::testing {
namespace {

constexpr std::chrono::milliseconds kPoll{5};

int status_of(int wait_status) {
  return WIFEXITED(wait_status) ? WEXITSTATUS(wait_status) : 128 + WTERMSIG(wait_status);
}

// In the child, before exec: `path` opened with `flags` as descriptor
// `target`. False if it cannot be opened. The descriptor opened first is
// close-on-exec, so only `target` reaches the program.
bool redirect(const std::filesystem::path& path, int flags, int target) {
  const int fd = ::open(path.c_str(), flags | O_CLOEXEC, 0600);
  if (fd < 0) return false;
  if (fd == target) return ::fcntl(fd, F_SETFD, 0) == 0;
  return ::dup2(fd, target) == target;
}

}  // namespace

Result<ChildProcess> ChildProcess::spawn(std::vector<std::string> argv,
                                         const SpawnOptions& options) {
  if (argv.empty()) return Status::invalid_argument("spawn: no program to run");
  std::vector<char*> args;
  for (std::string& arg : argv) args.push_back(arg.data());
  args.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid < 0) return posix_error("fork", errno);
  if (pid == 0) {
    if (options.own_process_group) ::setpgid(0, 0);
    const int output = O_WRONLY | O_CREAT | (options.append ? O_APPEND : O_TRUNC);
    if (!options.stdin_from.empty() && !redirect(options.stdin_from, O_RDONLY, STDIN_FILENO)) {
      ::_exit(127);
    }
    if (!options.stdout_to.empty() && !redirect(options.stdout_to, output, STDOUT_FILENO)) {
      ::_exit(127);
    }
    if (!options.stderr_to.empty()) {
      if (options.stderr_to == options.stdout_to) {
        ::dup2(STDOUT_FILENO, STDERR_FILENO);
      } else if (!redirect(options.stderr_to, output, STDERR_FILENO)) {
        ::_exit(127);
      }
    }
    if (options.open_files != 0) {
      const rlimit limit{options.open_files, options.open_files};
      if (::setrlimit(RLIMIT_NOFILE, &limit) != 0) ::_exit(126);
    }
    if (options.search_path) {
      ::execvp(args[0], args.data());
    } else {
      ::execv(args[0], args.data());
    }
    ::_exit(127);
  }
  if (options.own_process_group) ::setpgid(pid, pid);  // no race with an early signal
  return ChildProcess(pid, options.own_process_group);
}

Result<ChildProcess> ChildProcess::fork(const std::function<int()>& body) {
  const pid_t pid = ::fork();
  if (pid < 0) return posix_error("fork", errno);
  if (pid == 0) ::_exit(body());
  return ChildProcess(pid, false);
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)), group_(other.group_), exit_status_(other.exit_status_) {}

ChildProcess& ChildProcess::operator=(ChildProcess&& other) noexcept {
  if (this != &other) {
    stop();
    pid_ = std::exchange(other.pid_, -1);
    group_ = other.group_;
    exit_status_ = other.exit_status_;
  }
  return *this;
}

bool ChildProcess::reap(int flags) {
  if (pid_ < 0) return true;
  int wait_status = 0;
  pid_t reaped;
  do {
    reaped = ::waitpid(pid_, &wait_status, flags);
  } while (reaped < 0 && errno == EINTR);
  if (reaped == 0) return false;
  // Reaped, or not ours to wait for (reaped elsewhere): gone either way.
  exit_status_ = reaped == pid_ ? status_of(wait_status) : 128 + SIGKILL;
  pid_ = -1;
  return true;
}

void ChildProcess::signal(int number) const {
  if (pid_ < 0) return;
  ::kill(group_ ? -pid_ : pid_, number);
}

bool ChildProcess::running() { return !reap(WNOHANG); }

bool ChildProcess::wait_until(const std::function<bool()>& ready,
                              std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < deadline) {
    if (ready()) return true;
    if (!running()) return false;
    std::this_thread::sleep_for(kPoll);  // polling a real condition
  }
  return false;
}

int ChildProcess::wait() {
  reap(0);
  return exit_status_;
}

int ChildProcess::stop(std::chrono::milliseconds grace) {
  if (pid_ < 0) return exit_status_;
  signal(SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (!reap(WNOHANG)) {
    if (std::chrono::steady_clock::now() >= deadline) return kill_hard();
    std::this_thread::sleep_for(kPoll);  // polling a real condition
  }
  return exit_status_;
}

int ChildProcess::kill_hard() {
  if (pid_ < 0) return exit_status_;
  signal(SIGKILL);
  reap(0);
  return exit_status_;
}

std::function<bool()> listens_on(uint16_t port) {
  return [port] { return accepts_connections(port); };
}

std::function<bool()> listens_on(const std::filesystem::path& socket) {
  return [socket] { return connect_unix_socket(socket).valid(); };
}

}  // namespace lazyblock::testing
