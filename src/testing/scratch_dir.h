// ScratchDir: a fresh directory under $TMPDIR (or /tmp), removed with its
// contents when the ScratchDir goes away. For tests and benchmarks.
#pragma once

#include <filesystem>

#include "common/status.h"

namespace lazyblock::testing {

class ScratchDir {
 public:
  static Result<ScratchDir> create();
  ScratchDir(ScratchDir&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }
  ScratchDir& operator=(ScratchDir&& other) noexcept;
  ~ScratchDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  explicit ScratchDir(std::filesystem::path path) : path_(std::move(path)) {}
  void remove();
  std::filesystem::path path_;
};

}  // namespace lazyblock::testing
