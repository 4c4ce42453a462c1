#include "testing/scratch_dir.h"
#include "common/file_io.h"

#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <string>

namespace lazyblock::testing {

Result<ScratchDir> ScratchDir::create() {
  std::string pattern = (temp_directory() / "lazyblock-XXXXXX").string();
  if (::mkdtemp(pattern.data()) == nullptr) return posix_error("create a scratch directory", errno);
  return ScratchDir(pattern);
}

ScratchDir& ScratchDir::operator=(ScratchDir&& other) noexcept {
  if (this != &other) {
    remove();
    path_ = std::move(other.path_);
    other.path_.clear();
  }
  return *this;
}

ScratchDir::~ScratchDir() { remove(); }

void ScratchDir::remove() {
  std::error_code ignored;  // best effort: a leftover temp dir is no failure
  if (!path_.empty()) std::filesystem::remove_all(path_, ignored);
}

}  // namespace lazyblock::testing
