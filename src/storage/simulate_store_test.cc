#include "storage/simulate_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <optional>
#include <stop_token>
#include <thread>
#include <vector>

#include "common/units.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

using std::chrono::milliseconds;
using testing::first_pattern_mismatch;
using testing::make_pattern;

TEST(SimulateProfileTest, NamedProfiles) {
  Result<SimulateProfile> gcs = SimulateProfile::parse("gcs");
  ASSERT_TRUE(gcs);
  EXPECT_EQ(gcs->ttfb, milliseconds(20));
  EXPECT_DOUBLE_EQ(gcs->bytes_per_second, 100e6);
  Result<SimulateProfile> nfs = SimulateProfile::parse("nfs");
  ASSERT_TRUE(nfs);
  EXPECT_EQ(nfs->ttfb, milliseconds(1));
  EXPECT_DOUBLE_EQ(nfs->bytes_per_second, 500e6);
}

TEST(SimulateProfileTest, ExplicitProfiles) {
  Result<SimulateProfile> p = SimulateProfile::parse("ttfb=20ms,bw=100MB/s");
  ASSERT_TRUE(p);
  EXPECT_EQ(p->ttfb, milliseconds(20));
  EXPECT_DOUBLE_EQ(p->bytes_per_second, 100e6);
  EXPECT_EQ(p->to_string(), "ttfb=20ms,bw=100MB/s");
  Result<SimulateProfile> bare = SimulateProfile::parse("ttfb=5,bw=250");  // ms and MB/s
  ASSERT_TRUE(bare);
  EXPECT_EQ(bare->ttfb, milliseconds(5));
  EXPECT_DOUBLE_EQ(bare->bytes_per_second, 250e6);
}

TEST(SimulateProfileTest, RejectsNonsense) {
  for (const char* bad : {"", "s3", "ttfb=20ms", "bw=1MB/s", "ttfb=x,bw=1MB/s", "ttfb=1ms,bw=0MB/s",
                          "ttfb=1ms,bw=1MB/s,jitter=3", "ttfb"}) {
    Result<SimulateProfile> p = SimulateProfile::parse(bad);
    EXPECT_FALSE(p) << bad;
    if (!p) {
      EXPECT_EQ(p.status().code(), StatusCode::kInvalidArgument);
    }
  }
}

class SimulateStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    files_ = *FileStore::open(dir_);
    ASSERT_TRUE(files_->put("obj", make_pattern(11, 0, 4 * kMiB), IoContext{}).is_ok());
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::shared_ptr<FileStore> files_;
};

// The model is a lower bound: no byte arrives before its time. (Upper bounds
// are the benchmark's business, not a test's.)
TEST_F(SimulateStoreTest, BytesArriveNoEarlierThanTheModelSays) {
  SimulateStore store(files_, SimulateProfile{milliseconds(5), 1e9});
  const auto start = Clock::now();
  auto reader = store.open_range("obj", 0, 4 * kMiB, IoContext{});
  ASSERT_TRUE(reader) << reader.status().to_string();
  EXPECT_GE(Clock::now() - start, milliseconds(5));  // headers come with the first byte
  std::vector<std::byte> all;
  std::vector<std::byte> buffer(256 * kKiB);
  for (;;) {
    Result<size_t> got = (*reader)->read(buffer);
    ASSERT_TRUE(got);
    if (*got == 0) break;
    all.insert(all.end(), buffer.begin(), buffer.begin() + static_cast<long>(*got));
    // The first `all.size()` bytes are due 5 ms + size / 1 GB/s after the start.
    const auto due = milliseconds(5) + std::chrono::nanoseconds(all.size());
    EXPECT_GE(Clock::now() - start, due) << "after " << all.size() << " bytes";
  }
  ASSERT_EQ(all.size(), 4 * kMiB);
  EXPECT_EQ(first_pattern_mismatch(11, 0, all), all.size());
}

TEST_F(SimulateStoreTest, SmallReadsReturnAsSoonAsTheirBytesAreDue) {
  SimulateStore store(files_, SimulateProfile{milliseconds(1), 1e9});
  auto reader = store.open_range("obj", 4096, 100, IoContext{});
  ASSERT_TRUE(reader);
  std::vector<std::byte> buffer(1000);
  Result<size_t> got = (*reader)->read(buffer);
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, 100u);  // the whole (short) range in one read
  EXPECT_EQ(first_pattern_mismatch(11, 4096, std::span(buffer).first(100)), 100u);
  Result<size_t> end = (*reader)->read(buffer);
  ASSERT_TRUE(end);
  EXPECT_EQ(*end, 0u);
}

TEST_F(SimulateStoreTest, DeadlineEndsAWaitWithATimeout) {
  SimulateStore store(files_, SimulateProfile{std::chrono::seconds(30), 1e6});
  const IoContext io{Clock::now() + milliseconds(50), {}};
  auto reader = store.open_range("obj", 0, kMiB, io);
  ASSERT_FALSE(reader);
  EXPECT_EQ(reader.status().code(), StatusCode::kTimeout) << reader.status().to_string();

  // And mid-stream: 1 MB/s cannot deliver 1 MiB within 100 ms.
  SimulateStore slow(files_, SimulateProfile{milliseconds(1), 1e6});
  const IoContext io2{Clock::now() + milliseconds(100), {}};
  auto stream = slow.open_range("obj", 0, kMiB, io2);
  ASSERT_TRUE(stream);
  std::vector<std::byte> buffer(kMiB);
  Status status;
  for (;;) {
    Result<size_t> got = (*stream)->read(buffer);
    if (!got) {
      status = got.status();
      break;
    }
    ASSERT_NE(*got, 0u) << "the range ended before its deadline could pass";
  }
  EXPECT_EQ(status.code(), StatusCode::kTimeout) << status.to_string();
}

TEST_F(SimulateStoreTest, StopEndsAWaitWithCancelled) {
  SimulateStore store(files_, SimulateProfile{std::chrono::seconds(30), 1e6});
  std::stop_source stop;
  Result<std::unique_ptr<RangeReader>> reader = Status::io_error("not run");
  std::thread opener([&] {
    reader =
        store.open_range("obj", 0, kMiB, IoContext{Clock::time_point::max(), stop.get_token()});
  });
  stop.request_stop();
  opener.join();
  ASSERT_FALSE(reader);
  EXPECT_EQ(reader.status().code(), StatusCode::kCancelled) << reader.status().to_string();
}

TEST_F(SimulateStoreTest, ErrorsOfTheInnerStorePassThrough) {
  SimulateStore store(files_, SimulateProfile{milliseconds(1), 1e9});
  auto reader = store.open_range("missing", 0, 10, IoContext{});
  ASSERT_FALSE(reader);
  EXPECT_EQ(reader.status().code(), StatusCode::kNotFound);
  Result<uint64_t> size = store.stat("obj", IoContext{});
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, 4 * kMiB);
  EXPECT_NE(store.describe().find("simulate(ttfb=1ms,bw=1000MB/s) over file://"), std::string::npos)
      << store.describe();
}

}  // namespace
}  // namespace lazyblock
