// Logging: one line per event on stderr, "lazyblock: LEVEL: message".
// The level is process-wide, set once from --log-level.
#pragma once

#include <string_view>

#include <fmt/format.h>

#include "common/status.h"

namespace lazyblock {

enum class LogLevel { kDebug = 0, kInfo, kWarn, kError, kOff };

Result<LogLevel> parse_log_level(std::string_view name);
void set_log_level(LogLevel level);
bool log_enabled(LogLevel level);
void log_line(LogLevel level, std::string_view message);

template <typename... Args>
void log(LogLevel level, fmt::format_string<Args...> format, Args&&... args) {
  if (log_enabled(level)) log_line(level, fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace lazyblock
