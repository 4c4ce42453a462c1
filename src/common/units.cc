#include "common/units.h"

#include <cctype>
#include <charconv>
#include <cmath>
#include <limits>

#include <fmt/format.h>

namespace lazyblock {
namespace {

// Splits "12.5MiB" into 12.5 and "MiB"; fails on no number or a negative one.
bool split_number(std::string_view text, double* number, std::string_view* suffix) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    ++i;
  }
  if (i == 0) return false;
  auto [ptr, ec] = std::from_chars(text.data(), text.data() + i, *number);
  if (ec != std::errc() || ptr != text.data() + i) return false;
  *suffix = text.substr(i);
  while (!suffix->empty() && suffix->front() == ' ') suffix->remove_prefix(1);
  return true;
}

bool iequals(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(a[i])) !=
        std::tolower(static_cast<unsigned char>(b[i]))) {
      return false;
    }
  }
  return true;
}

// Bytes per unit for a size suffix; 0 if the suffix is unknown.
double size_unit(std::string_view suffix) {
  struct Unit {
    std::string_view name;
    double bytes;
  };
  static constexpr Unit kUnits[] = {
      {"", 1},
      {"b", 1},
      {"k", 1024.0},
      {"kib", 1024.0},
      {"kb", 1e3},
      {"m", 1048576.0},
      {"mib", 1048576.0},
      {"mb", 1e6},
      {"g", 1073741824.0},
      {"gib", 1073741824.0},
      {"gb", 1e9},
      {"t", 1099511627776.0},
      {"tib", 1099511627776.0},
      {"tb", 1e12},
  };
  for (const Unit& unit : kUnits) {
    if (iequals(suffix, unit.name)) return unit.bytes;
  }
  return 0;
}

}  // namespace

Result<uint64_t> parse_size(std::string_view text) {
  double number = 0;
  std::string_view suffix;
  const double unit = split_number(text, &number, &suffix) ? size_unit(suffix) : 0;
  if (unit == 0) {
    return Status::invalid_argument(
        fmt::format("invalid size '{}' (expected e.g. 4096, 4KiB, 1GiB, 100MB)", text));
  }
  const double bytes = number * unit;
  if (bytes != std::floor(bytes) || bytes >= 18446744073709551615.0) {
    return Status::invalid_argument(fmt::format("invalid size '{}': not a whole byte count", text));
  }
  return static_cast<uint64_t>(bytes);
}

Result<std::chrono::nanoseconds> parse_duration(std::string_view text) {
  double number = 0;
  std::string_view suffix;
  double unit_ns = 0;
  if (split_number(text, &number, &suffix)) {
    if (suffix.empty() || suffix == "s")
      unit_ns = 1e9;
    else if (suffix == "ms")
      unit_ns = 1e6;
    else if (suffix == "us")
      unit_ns = 1e3;
    else if (suffix == "ns")
      unit_ns = 1;
    else if (suffix == "m")
      unit_ns = 60e9;
    else if (suffix == "h")
      unit_ns = 3600e9;
  }
  if (unit_ns == 0 || number * unit_ns > 1e18) {
    return Status::invalid_argument(
        fmt::format("invalid duration '{}' (expected e.g. 250ms, 5s, 2m)", text));
  }
  return std::chrono::nanoseconds(static_cast<int64_t>(std::llround(number * unit_ns)));
}

Result<double> parse_rate(std::string_view text) {
  const size_t slash = text.rfind("/s");
  if (slash == std::string_view::npos || slash + 2 != text.size()) {
    return Status::invalid_argument(fmt::format("invalid rate '{}' (expected e.g. 100MB/s)", text));
  }
  double number = 0;
  std::string_view suffix;
  const double unit = split_number(text.substr(0, slash), &number, &suffix) ? size_unit(suffix) : 0;
  if (unit == 0 || number <= 0) {
    return Status::invalid_argument(fmt::format("invalid rate '{}' (expected e.g. 100MB/s)", text));
  }
  return number * unit;
}

std::string format_size(uint64_t bytes) {
  static constexpr const char* kNames[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int unit = 0;
  uint64_t scaled = bytes;
  while (unit < 4 && scaled >= 1024 && scaled % 1024 == 0) {
    scaled /= 1024;
    ++unit;
  }
  if (unit > 0 || bytes < 1024) return fmt::format("{} {}", scaled, kNames[unit]);
  double value = static_cast<double>(bytes);
  unit = 0;
  while (unit < 4 && value >= 1024) {
    value /= 1024;
    ++unit;
  }
  return fmt::format("{:.1f} {}", value, kNames[unit]);
}

}  // namespace lazyblock
