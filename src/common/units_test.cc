#include "common/units.h"

#include <gtest/gtest.h>

namespace lazyblock {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;

TEST(UnitsTest, ParseSize) {
  EXPECT_EQ(*parse_size("4096"), 4096u);
  EXPECT_EQ(*parse_size("4KiB"), 4096u);
  EXPECT_EQ(*parse_size("4k"), 4096u);
  EXPECT_EQ(*parse_size("1GiB"), kGiB);
  EXPECT_EQ(*parse_size("2M"), 2 * kMiB);
  EXPECT_EQ(*parse_size("100MB"), 100000000u);
  EXPECT_EQ(*parse_size("1.5KiB"), 1536u);
  EXPECT_EQ(*parse_size("0"), 0u);
}

TEST(UnitsTest, ParseSizeRejectsNonsense) {
  for (const char* bad : {"", "KiB", "-1", "4 parsecs", "1.3", "0x10", "99999999999TiB"}) {
    Result<uint64_t> parsed = parse_size(bad);
    EXPECT_FALSE(parsed) << bad;
    if (!parsed) {
      EXPECT_EQ(parsed.status().code(), StatusCode::kInvalidArgument);
      EXPECT_NE(parsed.status().message().find(bad), std::string::npos);
    }
  }
}

TEST(UnitsTest, ParseDuration) {
  EXPECT_EQ(*parse_duration("250ms"), milliseconds(250));
  EXPECT_EQ(*parse_duration("5s"), seconds(5));
  EXPECT_EQ(*parse_duration("2m"), seconds(120));
  EXPECT_EQ(*parse_duration("1h"), seconds(3600));
  EXPECT_EQ(*parse_duration("500us"), nanoseconds(500000));
  EXPECT_EQ(*parse_duration("1.5s"), milliseconds(1500));
  EXPECT_EQ(*parse_duration("3"), seconds(3));
  for (const char* bad : {"", "soon", "5 fortnights", "ms", "-1s"}) {
    EXPECT_FALSE(parse_duration(bad)) << bad;
  }
}

TEST(UnitsTest, ParseRate) {
  EXPECT_DOUBLE_EQ(*parse_rate("100MB/s"), 100e6);
  EXPECT_DOUBLE_EQ(*parse_rate("1GB/s"), 1e9);
  EXPECT_DOUBLE_EQ(*parse_rate("2MiB/s"), 2.0 * kMiB);
  for (const char* bad : {"100MB", "0MB/s", "fast/s", ""}) EXPECT_FALSE(parse_rate(bad)) << bad;
}

TEST(UnitsTest, FormatSize) {
  EXPECT_EQ(format_size(0), "0 B");
  EXPECT_EQ(format_size(1500), "1.5 KiB");
  EXPECT_EQ(format_size(4096), "4 KiB");
  EXPECT_EQ(format_size(4 * kMiB), "4 MiB");
  EXPECT_EQ(format_size(kGiB), "1 GiB");
  EXPECT_EQ(format_size(100), "100 B");
}

TEST(UnitsTest, Alignment) {
  EXPECT_EQ(align_down(4097, 4096), 4096u);
  EXPECT_EQ(align_up(4097, 4096), 8192u);
  EXPECT_EQ(align_up(8192, 4096), 8192u);
  EXPECT_EQ(div_round_up(1, 4096), 1u);
  EXPECT_EQ(div_round_up(0, 4096), 0u);
}

}  // namespace
}  // namespace lazyblock
