// PageRecord: the order in which a restored VM first touched its memory, as
// runs of memfile bytes, so that the next restore of the same snapshot can
// fetch and install those pages before the vCPUs ask (REAP's record and
// prefetch).
//
// File format, text: the line "lazyblock page record 1", then one run per
// line, "OFFSET LENGTH" in decimal bytes, in the order first touched. A page
// that continues one of the latest runs (up to 16 back) joins it, so that
// vCPUs sweeping memory side by side leave long runs.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "common/mutex.h"
#include "common/status.h"

namespace lazyblock::uffd {

struct PageRun {
  uint64_t offset = 0;
  uint64_t length = 0;
  bool operator==(const PageRun&) const = default;
};

std::string format_page_record(const std::vector<PageRun>& runs);
// kCorruption naming the line if `text` is not a page record.
Result<std::vector<PageRun>> parse_page_record(std::string_view text);

// Reads the record at `path`.
Result<std::vector<PageRun>> read_page_record(const std::filesystem::path& path);
// Writes it whole or not at all, as common/output_file.h writes outputs.
Status write_page_record(const std::filesystem::path& path, const std::vector<PageRun>& runs);

// Collects the pages a VM touches, each once, in order. Thread-safe.
class PageRecorder {
 public:
  // Notes that [offset, offset + length) was touched, if it was not before.
  void touched(uint64_t offset, uint64_t length);
  std::vector<PageRun> runs() const;

 private:
  mutable Mutex mu_;
  std::vector<PageRun> runs_ GUARDED_BY(mu_);
  std::vector<PageRun> seen_ GUARDED_BY(mu_);  // sorted, merged
};

}  // namespace lazyblock::uffd
