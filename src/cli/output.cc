#include "cli/output.h"

#include <unistd.h>

#include <cstdio>

#include "common/units.h"

namespace lazyblock::cli {

Progress::Progress(std::string label, uint64_t total)
    : label_(std::move(label)), total_(total), enabled_(::isatty(STDERR_FILENO) == 1) {}

Progress::~Progress() {
  if (!enabled_ || !drawn_) return;
  draw(last_done_);
  std::fputc('\n', stderr);
}

void Progress::update(uint64_t done) {
  last_done_ = done;
  if (!enabled_) return;
  const auto now = std::chrono::steady_clock::now();
  if (drawn_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
  last_draw_ = now;
  draw(done);
}

void Progress::draw(uint64_t done) {
  drawn_ = true;
  if (total_ == 0) {
    std::fprintf(stderr, "\r%s: %s", label_.c_str(), format_size(done).c_str());
  } else {
    std::fprintf(stderr, "\r%s: %s of %s (%.0f%%)   ", label_.c_str(), format_size(done).c_str(),
                 format_size(total_).c_str(),
                 100.0 * static_cast<double>(done) / static_cast<double>(total_));
  }
  std::fflush(stderr);
}

Status ProgressSink::write(std::span<const std::byte> data) {
  LB_RETURN_IF_ERROR(inner_.write(data));
  done_ += data.size();
  progress_.update(done_);
  return Status::ok();
}

Status ProgressSink::write_zeros(uint64_t count) {
  LB_RETURN_IF_ERROR(inner_.write_zeros(count));
  done_ += count;
  progress_.update(done_);
  return Status::ok();
}

}  // namespace lazyblock::cli
