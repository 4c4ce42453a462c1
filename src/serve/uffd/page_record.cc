#include "serve/uffd/page_record.h"

#include <algorithm>
#include <charconv>
#include <fstream>

#include <fmt/format.h>

#include "common/file_io.h"
#include "common/output_file.h"

namespace lazyblock::uffd {
namespace {

constexpr std::string_view kFirstLine = "lazyblock page record 1";

// How many of the latest runs a newly touched page may extend.
constexpr size_t kRecentRuns = 16;

}  // namespace

std::string format_page_record(const std::vector<PageRun>& runs) {
  std::string text(kFirstLine);
  text += '\n';
  for (const PageRun& run : runs) text += fmt::format("{} {}\n", run.offset, run.length);
  return text;
}

Result<std::vector<PageRun>> parse_page_record(std::string_view text) {
  std::vector<PageRun> runs;
  size_t line_number = 0;
  while (!text.empty()) {
    const size_t newline = text.find('\n');
    const std::string_view line = text.substr(0, newline);
    text = newline == std::string_view::npos ? std::string_view() : text.substr(newline + 1);
    ++line_number;
    if (line_number == 1) {
      if (line != kFirstLine) {
        return Status::corruption(
            fmt::format("not a page record: the first line is not '{}'", kFirstLine));
      }
      continue;
    }
    if (line.empty()) continue;
    PageRun run;
    const char* const end = line.data() + line.size();
    auto [after_offset, e1] = std::from_chars(line.data(), end, run.offset);
    const bool spaced = e1 == std::errc() && after_offset < end && *after_offset == ' ';
    auto [after_length, e2] = spaced ? std::from_chars(after_offset + 1, end, run.length)
                                     : std::from_chars_result{end, std::errc::invalid_argument};
    if (!spaced || e2 != std::errc() || after_length != end || run.length == 0 ||
        run.offset + run.length < run.offset) {
      return Status::corruption(
          fmt::format("page record line {}: '{}' is not 'OFFSET LENGTH'", line_number, line));
    }
    runs.push_back(run);
  }
  if (line_number == 0) return Status::corruption("the page record is empty");
  return runs;
}

Result<std::vector<PageRun>> read_page_record(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::not_found(fmt::format("cannot open page record {}", path.string()));
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  Result<std::vector<PageRun>> runs = parse_page_record(text);
  if (!runs) return runs.status().with_context(path.string());
  return runs;
}

Status write_page_record(const std::filesystem::path& path, const std::vector<PageRun>& runs) {
  Result<std::unique_ptr<OutputFile>> out = OutputFile::open(path.string());
  if (!out) return out.status().with_context("page record");
  const std::string text = format_page_record(runs);
  LB_RETURN_IF_ERROR((*out)->sink().write(std::as_bytes(std::span(text.data(), text.size()))));
  return (*out)->commit().with_context("page record");
}

void PageRecorder::touched(uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;
  MutexLock lock(mu_);
  // seen_ is sorted and merged: the run starting at or before `offset`.
  auto it = std::upper_bound(seen_.begin(), seen_.end(), offset,
                             [](uint64_t o, const PageRun& r) { return o < r.offset; });
  if (it != seen_.begin()) {
    const PageRun& before = *std::prev(it);
    if (offset < before.offset + before.length) return;  // touched before
  }
  // Merge into seen_: with the run ending at `offset` and the one starting at `end`.
  const bool joins_before =
      it != seen_.begin() && std::prev(it)->offset + std::prev(it)->length == offset;
  const bool joins_after = it != seen_.end() && it->offset == end;
  if (joins_before && joins_after) {
    std::prev(it)->length += length + it->length;
    seen_.erase(it);
  } else if (joins_before) {
    std::prev(it)->length += length;
  } else if (joins_after) {
    it->offset = offset;
    it->length += length;
  } else {
    seen_.insert(it, PageRun{offset, length});
  }
  // And into the order: a page that continues one of the last few runs
  // joins it, so that vCPUs sweeping memory side by side leave a few long
  // runs rather than many one-page ones.
  const size_t recent = std::min(runs_.size(), kRecentRuns);
  for (size_t i = runs_.size(); i > runs_.size() - recent; --i) {
    PageRun& run = runs_[i - 1];
    if (run.offset + run.length == offset) {
      run.length += length;
      return;
    }
  }
  runs_.push_back(PageRun{offset, length});
}

std::vector<PageRun> PageRecorder::runs() const {
  MutexLock lock(mu_);
  return runs_;
}

}  // namespace lazyblock::uffd
