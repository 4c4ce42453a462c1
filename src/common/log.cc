#include "common/log.h"

#include <atomic>
#include <cstdio>

namespace lazyblock {
namespace {

std::atomic<LogLevel> g_level{LogLevel::kWarn};

constexpr std::string_view kNames[] = {"debug", "info", "warn", "error", "off"};

}  // namespace

Result<LogLevel> parse_log_level(std::string_view name) {
  for (int i = 0; i < 5; ++i) {
    if (name == kNames[i]) return static_cast<LogLevel>(i);
  }
  return Status::invalid_argument(
      fmt::format("unknown log level '{}' (expected debug, info, warn, error or off)", name));
}

void set_log_level(LogLevel level) { g_level.store(level, std::memory_order_relaxed); }

bool log_enabled(LogLevel level) { return level >= g_level.load(std::memory_order_relaxed); }

void log_line(LogLevel level, std::string_view message) {
  // One fprintf per line: stdio locks the stream, so lines from threads do
  // not interleave.
  std::fprintf(stderr, "lazyblock: %s: %.*s\n", kNames[static_cast<int>(level)].data(),
               static_cast<int>(message.size()), message.data());
}

}  // namespace lazyblock
