#include "storage/fault_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <optional>
#include <thread>
#include <vector>

#include "common/units.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

using testing::first_pattern_mismatch;
using testing::make_pattern;

TEST(FaultSpecTest, ParsesEveryFault) {
  Result<FaultSpec> spec =
      FaultSpec::parse("fail-open,fail-after=1MiB,stall-after=4096,short=100,size=200,times=3");
  ASSERT_TRUE(spec) << spec.status().to_string();
  EXPECT_TRUE(spec->fail_open);
  EXPECT_EQ(spec->fail_after, kMiB);
  EXPECT_EQ(spec->stall_after, 4096u);
  EXPECT_EQ(spec->short_object, 100u);
  EXPECT_EQ(spec->reported_size, 200u);
  EXPECT_EQ(spec->times, 3u);
  EXPECT_EQ(spec->to_string(),
            "fail-open,fail-after=1048576,stall-after=4096,short=100,size=200,times=3");
  EXPECT_EQ(FaultSpec::parse("none")->to_string(), "none");
  EXPECT_EQ(FaultSpec::parse("")->to_string(), "none");
}

TEST(FaultSpecTest, RejectsUnknownFaultsAndBadNumbers) {
  for (const char* bad :
       {"explode", "fail-after", "fail-after=lots", "short=", "fail-open=1", "size=1,,"}) {
    Result<FaultSpec> spec = FaultSpec::parse(bad);
    EXPECT_FALSE(spec) << bad;
    if (!spec) {
      EXPECT_EQ(spec.status().code(), StatusCode::kInvalidArgument);
    }
  }
}

class FaultStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    files_ = *FileStore::open(dir_);
    ASSERT_TRUE(files_->put("obj", make_pattern(21, 0, kObjectSize), IoContext{}).is_ok());
    store_ = std::make_shared<FaultStore>(files_);
  }

  // Reads the range [offset, offset + length) to its end or first error;
  // returns the bytes that arrived and the error, if any.
  std::pair<std::vector<std::byte>, Status> read_range(uint64_t offset, uint64_t length,
                                                       const IoContext& io = {}) {
    std::vector<std::byte> out;
    auto reader = store_->open_range("obj", offset, length, io);
    if (!reader) return {out, reader.status()};
    std::vector<std::byte> buffer(7000);
    for (;;) {
      Result<size_t> got = (*reader)->read(buffer);
      if (!got) return {out, got.status()};
      if (*got == 0) return {out, Status::ok()};
      out.insert(out.end(), buffer.begin(), buffer.begin() + static_cast<long>(*got));
    }
  }

  static constexpr uint64_t kObjectSize = 100000;
  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::shared_ptr<FileStore> files_;
  std::shared_ptr<FaultStore> store_;
};

TEST_F(FaultStoreTest, NoFaultsPassesEverythingThrough) {
  auto [bytes, status] = read_range(10, 50000);
  EXPECT_TRUE(status.is_ok());
  ASSERT_EQ(bytes.size(), 50000u);
  EXPECT_EQ(first_pattern_mismatch(21, 10, bytes), bytes.size());
  EXPECT_EQ(store_->opens(), 1);
}

TEST_F(FaultStoreTest, FailOpen) {
  store_->set(*FaultSpec::parse("fail-open"));
  auto [bytes, status] = read_range(0, 10);
  EXPECT_EQ(status.code(), StatusCode::kUnavailable);
  EXPECT_NE(status.message().find("injected fault"), std::string::npos);
  EXPECT_NE(status.message().find("obj"), std::string::npos);
  EXPECT_EQ(store_->stat("obj", IoContext{}).status().code(), StatusCode::kUnavailable);
  store_->set(FaultSpec{});
  EXPECT_TRUE(read_range(0, 10).second.is_ok());
  EXPECT_EQ(store_->opens(), 2);
}

TEST_F(FaultStoreTest, FailAfterDeliversExactlyThatManyBytesFirst) {
  store_->set(*FaultSpec::parse("fail-after=12345"));
  auto [bytes, status] = read_range(1000, 50000);
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.to_string();
  ASSERT_EQ(bytes.size(), 12345u);
  EXPECT_EQ(first_pattern_mismatch(21, 1000, bytes), bytes.size());
}

TEST_F(FaultStoreTest, TimesLimitsTheFaultsToTheFirstCalls) {
  store_->set(*FaultSpec::parse("fail-after=100,times=2"));
  EXPECT_EQ(read_range(0, 5000).second.code(), StatusCode::kUnavailable);
  EXPECT_EQ(read_range(0, 5000).second.code(), StatusCode::kUnavailable);
  auto [bytes, status] = read_range(0, 5000);
  EXPECT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(bytes.size(), 5000u);
  // Setting a spec starts the count again.
  store_->set(*FaultSpec::parse("fail-open,times=1"));
  EXPECT_EQ(store_->stat("obj", IoContext{}).status().code(), StatusCode::kUnavailable);
  EXPECT_TRUE(store_->stat("obj", IoContext{}));
}

TEST_F(FaultStoreTest, ShortObjectEndsStreamsCleanlyButEarly) {
  store_->set(*FaultSpec::parse("short=30000"));
  auto reader = store_->open_range("obj", 20000, 50000, IoContext{});
  ASSERT_TRUE(reader);
  EXPECT_EQ((*reader)->object_size(), kObjectSize);  // the size still claims it all
  EXPECT_EQ((*reader)->range_length(), 50000u);
  auto [bytes, status] = read_range(20000, 50000);
  EXPECT_TRUE(status.is_ok());  // a clean end: the caller must count
  ASSERT_EQ(bytes.size(), 10000u);
  EXPECT_EQ(first_pattern_mismatch(21, 20000, bytes), bytes.size());
}

TEST_F(FaultStoreTest, WrongSizeIsReportedEverywhere) {
  store_->set(*FaultSpec::parse("size=200000"));
  EXPECT_EQ(*store_->stat("obj", IoContext{}), 200000u);
  auto reader = store_->open_range("obj", 90000, 50000, IoContext{});
  ASSERT_TRUE(reader);
  EXPECT_EQ((*reader)->object_size(), 200000u);
  EXPECT_EQ((*reader)->range_length(), 50000u);  // promised; only 10000 exist
  EXPECT_EQ(read_range(90000, 50000).first.size(), 10000u);
}

TEST_F(FaultStoreTest, StallHoldsUntilReleased) {
  store_->set(*FaultSpec::parse("stall-after=5000"));
  std::pair<std::vector<std::byte>, Status> result;
  std::thread reader([&] { result = read_range(0, 20000); });
  store_->wait_for_stalls(1);
  store_->release_stalls();
  reader.join();
  EXPECT_TRUE(result.second.is_ok()) << result.second.to_string();
  ASSERT_EQ(result.first.size(), 20000u);
  EXPECT_EQ(first_pattern_mismatch(21, 0, result.first), result.first.size());
}

TEST_F(FaultStoreTest, StallEndsAtTheDeadline) {
  store_->set(*FaultSpec::parse("stall-after=5000"));
  auto [bytes, status] =
      read_range(0, 20000, IoContext{Clock::now() + std::chrono::milliseconds(50), {}});
  EXPECT_EQ(status.code(), StatusCode::kTimeout) << status.to_string();
  EXPECT_EQ(bytes.size(), 5000u);
}

TEST_F(FaultStoreTest, StallEndsOnStop) {
  store_->set(*FaultSpec::parse("stall-after=0"));
  std::stop_source stop;
  std::pair<std::vector<std::byte>, Status> result;
  std::thread reader([&] {
    result = read_range(0, 20000, IoContext{Clock::time_point::max(), stop.get_token()});
  });
  store_->wait_for_stalls(1);
  stop.request_stop();
  reader.join();
  EXPECT_EQ(result.second.code(), StatusCode::kCancelled) << result.second.to_string();
  EXPECT_TRUE(result.first.empty());
}

TEST_F(FaultStoreTest, AStreamKeepsTheFaultsItWasOpenedWith) {
  store_->set(*FaultSpec::parse("fail-after=100"));
  auto reader = store_->open_range("obj", 0, 1000, IoContext{});
  ASSERT_TRUE(reader);
  store_->set(FaultSpec{});
  std::vector<std::byte> buffer(1000);
  Result<size_t> got = (*reader)->read(buffer);
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, 100u);
  EXPECT_FALSE((*reader)->read(buffer));
}

}  // namespace
}  // namespace lazyblock
