#include "bench/bench_util.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <string>

namespace lazyblock {

Result<ScratchDir> ScratchDir::create() {
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern =
      std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/lazyblock-bench-XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr) return posix_error("create a scratch directory", errno);
  return ScratchDir(pattern);
}

ScratchDir::~ScratchDir() {
  std::error_code ignored;  // best effort: a leftover temp dir is no failure
  if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
}

double percentile(const std::vector<double>& sorted, double fraction) {
  if (sorted.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(fraction * static_cast<double>(sorted.size())));
  return sorted[std::clamp<size_t>(rank, 1, sorted.size()) - 1];
}

}  // namespace lazyblock
