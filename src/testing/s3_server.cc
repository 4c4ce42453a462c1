#include "testing/s3_server.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <fstream>
#include <iterator>
#include <thread>

#include <fmt/format.h>

#include "testing/local_port.h"

namespace lazyblock::testing {

Result<std::unique_ptr<S3Server>> S3Server::start(const std::vector<std::string>& buckets) {
  const std::string script = std::string(LAZYBLOCK_SOURCE_DIR) +
                             "/tests/s3rver/node_modules/s3rver/bin/s3rver.js";
  if (::access("/usr/bin/node", X_OK) != 0 || ::access(script.c_str(), R_OK) != 0) {
    return Status::not_found(fmt::format(
        "the S3 test server is not installed ({} missing): run scripts/install-deps", script));
  }
  Status last_failure;
  for (int attempt = 0; attempt < 5; ++attempt) {
    Result<ScratchDir> dir = ScratchDir::create();
    if (!dir) return dir.status();
    Result<uint16_t> port = free_port();
    if (!port) return port.status();
    const std::string data = (dir->path() / "data").string();
    const std::string log = (dir->path() / "s3rver.log").string();
    std::vector<std::string> args = {"node", script, "-d", data, "-a", "127.0.0.1",
                                     "-p", std::to_string(*port)};
    for (const std::string& bucket : buckets) {
      args.push_back("--configure-bucket");
      args.push_back(bucket);
    }
    const pid_t pid = ::fork();
    if (pid < 0) return posix_error("fork", errno);
    if (pid == 0) {
      ::setpgid(0, 0);
      const int out = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      ::dup2(out, STDOUT_FILENO);
      ::dup2(out, STDERR_FILENO);
      std::vector<char*> argv;
      for (std::string& arg : args) argv.push_back(arg.data());
      argv.push_back(nullptr);
      ::execv("/usr/bin/node", argv.data());
      ::_exit(127);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    int status = 0;
    bool exited = false;
    while (std::chrono::steady_clock::now() < deadline) {
      if (accepts_connections(*port)) {
        return std::unique_ptr<S3Server>(new S3Server(std::move(dir).value(), *port, pid));
      }
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));  // polling a real condition
    }
    if (!exited) {
      ::kill(-pid, SIGKILL);
      ::waitpid(pid, &status, 0);
    }
    std::ifstream in(log);
    const std::string output{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    last_failure = Status::io_error(fmt::format("s3rver did not start on port {}: {}", *port, output));
    if (output.find("EADDRINUSE") == std::string::npos) break;
  }
  return last_failure;
}

S3Server::~S3Server() {
  ::kill(-pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
}

std::string S3Server::endpoint() const { return fmt::format("http://127.0.0.1:{}", port_); }

}  // namespace lazyblock::testing
