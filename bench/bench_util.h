// Small pieces the benchmarks share.
#pragma once

#include <filesystem>
#include <vector>

#include "common/status.h"

namespace lazyblock {

// A scratch directory under $TMPDIR (or /tmp), removed with its contents
// when this goes away.
class ScratchDir {
 public:
  static Result<ScratchDir> create();
  ScratchDir(ScratchDir&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }
  ~ScratchDir();
  const std::filesystem::path& path() const { return path_; }

 private:
  explicit ScratchDir(std::filesystem::path path) : path_(std::move(path)) {}
  std::filesystem::path path_;
};

// The nearest-rank percentile (`fraction` in (0, 1]) of `sorted`, which is
// sorted ascending; 0 if empty.
double percentile(const std::vector<double>& sorted, double fraction);

}  // namespace lazyblock
