#include "tests/cli_runner.h"

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

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

std::string lazyblock_binary() { return LAZYBLOCK_BINARY; }

Outcome run_lazyblock(const std::filesystem::path& dir, std::vector<std::string> args,
                      const std::filesystem::path& input) {
  args.insert(args.begin(), LAZYBLOCK_BINARY);
  return run_program_with_input(dir, args, input);
}

Outcome run_program(const std::filesystem::path& dir, const std::string& program,
                    std::vector<std::string> args) {
  args.insert(args.begin(), program);
  return run_program_with_input(dir, args, {});
}

}  // namespace lazyblock
