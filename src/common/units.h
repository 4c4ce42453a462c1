// Parsing and printing of the quantities users type: sizes ("4KiB", "1GiB",
// "100MB"), durations ("250ms", "5s", "2m") and rates ("100MB/s").
// MB is 10^6 bytes and MiB 2^20, as everywhere in lazyblock.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include "common/status.h"

namespace lazyblock {

constexpr uint64_t kKiB = 1024;
constexpr uint64_t kMiB = 1024 * kKiB;
constexpr uint64_t kGiB = 1024 * kMiB;

// "4096", "4KiB", "4k" (= KiB), "1GiB", "100MB", "2M" (= MiB).
Result<uint64_t> parse_size(std::string_view text);

// "250ms", "5s", "2m", "1h", "500us", "0". A bare number is seconds.
Result<std::chrono::nanoseconds> parse_duration(std::string_view text);

// "100MB/s", "1GB/s", "500MiB/s" -> bytes per second (> 0).
Result<double> parse_rate(std::string_view text);

// 4194304 -> "4 MiB", 1500 -> "1500 B".
std::string format_size(uint64_t bytes);

// Rounds `value` down / up to a multiple of `align` (> 0).
constexpr uint64_t align_down(uint64_t value, uint64_t align) { return value - value % align; }
constexpr uint64_t align_up(uint64_t value, uint64_t align) {
  return value % align == 0 ? value : value + (align - value % align);
}
constexpr uint64_t div_round_up(uint64_t value, uint64_t divisor) {
  return value / divisor + (value % divisor != 0 ? 1 : 0);
}

}  // namespace lazyblock
