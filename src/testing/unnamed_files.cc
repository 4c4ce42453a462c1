#include "testing/unnamed_files.h"

#include <sys/stat.h>

#include <string>
#include <system_error>

namespace lazyblock::testing {

std::vector<std::filesystem::path> unnamed_files_of(pid_t pid, const std::filesystem::path& dir) {
  std::vector<std::filesystem::path> files;
  std::error_code error;
  const std::filesystem::path fds = "/proc/" + std::to_string(pid) + "/fd";
  for (const auto& entry : std::filesystem::directory_iterator(fds, error)) {
    std::error_code link_error;
    const std::string target = std::filesystem::read_symlink(entry.path(), link_error).string();
    if (link_error || target.find("(deleted)") == std::string::npos) continue;
    if (!dir.empty() && target.rfind(dir.string() + "/", 0) != 0) continue;
    struct stat st {};
    if (::stat(entry.path().c_str(), &st) == 0 && S_ISREG(st.st_mode)) {
      files.push_back(entry.path());
    }
  }
  return files;
}

std::filesystem::path unnamed_file_of_size(pid_t pid, uint64_t size) {
  std::filesystem::path found;
  int matches = 0;
  for (const std::filesystem::path& file : unnamed_files_of(pid)) {
    struct stat st {};
    if (::stat(file.c_str(), &st) == 0 && static_cast<uint64_t>(st.st_size) == size) {
      found = file;
      ++matches;
    }
  }
  return matches == 1 ? found : std::filesystem::path();
}

}  // namespace lazyblock::testing
