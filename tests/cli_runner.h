// Runs the lazyblock binary as a user would, for the integration tests.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

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

// Runs `program` (found on PATH) with `args` the same way.
Outcome run_program(const std::filesystem::path& dir, const std::string& program,
                    std::vector<std::string> args);

// The lazyblock binary under test.
std::string lazyblock_binary();

}  // namespace lazyblock
