#include "cli/output.h"

#include <unistd.h>

#include <cstdio>
#include <string>

#include "common/units.h"

namespace lazyblock::cli {

namespace {
ProgressMode g_progress_mode = ProgressMode::kAuto;
}  // namespace

void set_progress_mode(ProgressMode mode) { g_progress_mode = mode; }

Progress::Progress(std::string label, uint64_t total)
    : label_(std::move(label)),
      total_(total),
      enabled_(g_progress_mode == ProgressMode::kOn ||
               (g_progress_mode == ProgressMode::kAuto && ::isatty(STDERR_FILENO) == 1)) {}

Progress::~Progress() {
  if (!enabled_ || !drawn_) return;
  draw(last_done_);
  if (::isatty(STDERR_FILENO) == 1) std::fputc('\n', stderr);
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
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  const double rate = seconds > 0 ? static_cast<double>(done) / seconds : 0;  // bytes/s
  std::string line = label_ + ": " + format_size(done);
  if (total_ > 0) {
    line += " of " + format_size(total_);
    char percent[32];
    std::snprintf(percent, sizeof percent, " (%.0f%%)",
                  100.0 * static_cast<double>(done) / static_cast<double>(total_));
    line += percent;
  }
  if (rate > 0) {
    char speed[64];
    std::snprintf(speed, sizeof speed, ", %.1f MB/s", rate / 1e6);
    line += speed;
    if (total_ > done) {
      std::snprintf(speed, sizeof speed, ", %.0f s left",
                    static_cast<double>(total_ - done) / rate);
      line += speed;
    }
  }
  // The terminal gets a line redrawn in place; anything else a line each time.
  const bool terminal = ::isatty(STDERR_FILENO) == 1;
  std::fprintf(stderr, terminal ? "\r%s   " : "%s\n", line.c_str());
  std::fflush(stderr);
}

Status ProgressSink::write(std::span<const std::byte> data) {
  LB_RETURN_IF_ERROR(inner_.write(data));
  done_ += data.size();
  progress_.update(done_);
  return Status::ok();
}

Result<size_t> ProgressSink::write_from_mapping(std::span<const std::byte> data) {
  Result<size_t> written = inner_.write_from_mapping(data);
  if (!written) return written.status();
  done_ += *written;
  progress_.update(done_);
  return written;
}

Status ProgressSink::write_zeros(uint64_t count) {
  LB_RETURN_IF_ERROR(inner_.write_zeros(count));
  done_ += count;
  progress_.update(done_);
  return Status::ok();
}

}  // namespace lazyblock::cli
