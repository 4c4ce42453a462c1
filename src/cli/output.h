// A progress line on a terminal for commands that move many bytes (where
// the bytes go is common/output_file.h).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>

#include "common/byte_sink.h"
#include "common/status.h"

namespace lazyblock::cli {

// Whether progress lines are drawn: on a terminal (kAuto), always, or never
// (--progress / --quiet). Set once, from the command line.
enum class ProgressMode { kAuto, kOn, kOff };
void set_progress_mode(ProgressMode mode);

// "pack rootfs.ext4: 312 MiB of 1 GiB (30%), 95.2 MB/s, 7 s left" on stderr,
// redrawn at most ten times a second.
class Progress {
 public:
  Progress(std::string label, uint64_t total);
  ~Progress();
  void update(uint64_t done);

 private:
  void draw(uint64_t done);

  const std::string label_;
  const uint64_t total_;  // 0: unknown
  const bool enabled_;
  const std::chrono::steady_clock::time_point started_ = std::chrono::steady_clock::now();
  std::chrono::steady_clock::time_point last_draw_{};
  uint64_t last_done_ = 0;
  bool drawn_ = false;
};

// Passes bytes on to another sink, reporting progress.
class ProgressSink final : public ByteSink {
 public:
  ProgressSink(ByteSink& inner, Progress& progress) : inner_(inner), progress_(progress) {}
  Status write(std::span<const std::byte> data) override;
  Status write_zeros(uint64_t count) override;
  Result<size_t> write_from_mapping(std::span<const std::byte> data) override;

 private:
  ByteSink& inner_;
  Progress& progress_;
  uint64_t done_ = 0;
};

}  // namespace lazyblock::cli
