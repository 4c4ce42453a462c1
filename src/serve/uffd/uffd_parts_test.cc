// The parts of the UFFD handler that need no VM: Firecracker's region
// mappings, and page records.
#include <gtest/gtest.h>

#include "common/units.h"
#include "serve/uffd/guest_regions.h"
#include "serve/uffd/page_record.h"
#include "testing/scratch_dir.h"

namespace lazyblock::uffd {
namespace {

constexpr uint64_t kMemfile = 64 * kMiB;

std::string region_json(uint64_t base, uint64_t size, uint64_t offset, const char* page_field,
                        uint64_t page) {
  return "{\"base_host_virt_addr\":" + std::to_string(base) + ",\"size\":" + std::to_string(size) +
         ",\"offset\":" + std::to_string(offset) + ",\"" + page_field +
         "\":" + std::to_string(page) + "}";
}

TEST(GuestRegionsTest, ParsesFirecrackerMappingsSortedByAddress) {
  // Two regions around a gap, in the order Firecracker may list them; the
  // second from an older version that sends only page_size_kib (in bytes).
  const std::string json =
      "[" + region_json(0x7f0000400000, 4 * kMiB, 8 * kMiB, "page_size", 2 * kMiB) + "," +
      region_json(0x7f0000000000, 2 * kMiB, 0, "page_size_kib", 4096) + "]";
  Result<std::vector<GuestRegion>> regions = parse_guest_regions(json, kMemfile);
  ASSERT_TRUE(regions) << regions.status().to_string();
  ASSERT_EQ(regions->size(), 2u);
  EXPECT_EQ((*regions)[0].base, 0x7f0000000000u);
  EXPECT_EQ((*regions)[0].page_size, 4096u);
  EXPECT_FALSE((*regions)[0].huge());
  EXPECT_EQ((*regions)[1].offset, 8 * kMiB);
  EXPECT_TRUE((*regions)[1].huge());

  EXPECT_EQ(region_at(*regions, 0x7f0000000000 + 2 * kMiB - 1), &(*regions)[0]);
  EXPECT_EQ(region_at(*regions, 0x7f0000000000 + 2 * kMiB), nullptr);  // the gap
  EXPECT_EQ(region_at(*regions, 0x7f0000400000 + 4 * kMiB - 1), &(*regions)[1]);
  EXPECT_EQ(region_at(*regions, 0x10), nullptr);
  EXPECT_EQ(region_of_offset(*regions, 8 * kMiB + 5), &(*regions)[1]);
  EXPECT_EQ(region_of_offset(*regions, 3 * kMiB), nullptr);
}

TEST(GuestRegionsTest, RefusesInconsistentMappingsByName) {
  const struct {
    std::string json;
    std::string says;
  } cases[] = {
      {"[{\"base_host_virt_addr\":", "not valid JSON"},
      {"{}", "not a non-empty JSON array"},
      {"[]", "not a non-empty JSON array"},
      {"[1]", "not a JSON object"},
      {"[{\"size\":4096,\"offset\":0,\"page_size\":4096}]", "no 'base_host_virt_addr'"},
      {"[{\"base_host_virt_addr\":-4096,\"size\":4096,\"offset\":0,\"page_size\":4096}]",
       "not a non-negative integer"},
      {"[" + region_json(4096, 4096, 0, "page_size", 65536) + "]", "neither 4 KiB nor 2 MiB"},
      {"[" + region_json(4096, 2 * kMiB, 0, "page_size", 2 * kMiB) + "]", "not aligned"},
      {"[" + region_json(4096, 0, 0, "page_size", 4096) + "]", "empty or not aligned"},
      {"[" + region_json(4096, 8192, kMemfile - 4096, "page_size", 4096) + "]",
       "outside the 67108864-byte memfile"},
      {"[" + region_json(4096, 4096, kMemfile + 4096, "page_size", 4096) + "]", "outside the"},
      {"[" + region_json(4096, 8192, 0, "page_size", 4096) + "," +
           region_json(8192, 4096, 0, "page_size", 4096) + "]",
       "overlap"},
  };
  for (const auto& c : cases) {
    Result<std::vector<GuestRegion>> regions = parse_guest_regions(c.json, kMemfile);
    ASSERT_FALSE(regions) << c.json;
    EXPECT_EQ(regions.status().code(), StatusCode::kInvalidArgument);
    EXPECT_NE(regions.status().message().find(c.says), std::string::npos)
        << c.json << ": " << regions.status().message();
  }
}

TEST(PageRecordTest, RecorderKeepsFirstTouchOrderAndMergesRuns) {
  PageRecorder recorder;
  recorder.touched(8192, 4096);
  recorder.touched(12288, 4096);  // follows on: same run
  recorder.touched(0, 4096);
  recorder.touched(8192, 4096);  // again: not recorded twice
  recorder.touched(4096, 4096);  // follows 0: same run
  recorder.touched(2 * kMiB, 2 * kMiB);
  recorder.touched(12288, 4096);
  const std::vector<PageRun> want = {{8192, 8192}, {0, 8192}, {2 * kMiB, 2 * kMiB}};
  EXPECT_EQ(recorder.runs(), want);

  // Two vCPUs sweeping side by side leave two runs.
  PageRecorder sweeps;
  for (uint64_t page = 0; page < 100; ++page) {
    sweeps.touched(page * 4096, 4096);
    sweeps.touched(kMiB + page * 4096, 4096);
  }
  const std::vector<PageRun> two = {{0, 100 * 4096}, {kMiB, 100 * 4096}};
  EXPECT_EQ(sweeps.runs(), two);
}

TEST(PageRecordTest, RoundTripsThroughAFileAndRefusesGarbage) {
  Result<testing::ScratchDir> dir = testing::ScratchDir::create();
  ASSERT_TRUE(dir);
  const std::vector<PageRun> runs = {{5 * kMiB, 65536}, {0, 4096}, {1ULL << 40, 2 * kMiB}};
  const std::filesystem::path path = dir->path() / "record";
  ASSERT_TRUE(write_page_record(path, runs).is_ok());
  Result<std::vector<PageRun>> read = read_page_record(path);
  ASSERT_TRUE(read) << read.status().to_string();
  EXPECT_EQ(*read, runs);
  EXPECT_FALSE(std::filesystem::exists(path.string() + ".tmp"));

  for (const char* bad : {"", "lazyblock page record 2\n", "lazyblock page record 1\n12\n",
                          "lazyblock page record 1\n12 0\n", "lazyblock page record 1\n1 2 3\n",
                          "lazyblock page record 1\nx 4096\n",
                          "lazyblock page record 1\n18446744073709551615 4096\n"}) {
    Result<std::vector<PageRun>> parsed = parse_page_record(bad);
    EXPECT_FALSE(parsed) << bad;
    if (!parsed) {
      EXPECT_EQ(parsed.status().code(), StatusCode::kCorruption) << bad;
    }
  }
  EXPECT_FALSE(read_page_record(dir->path() / "missing"));
}

}  // namespace
}  // namespace lazyblock::uffd
