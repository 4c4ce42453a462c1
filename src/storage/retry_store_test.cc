// The retry layer over a real file store, broken by the fault layer in the
// ways a remote store breaks.
#include "storage/retry_store.h"

#include <gtest/gtest.h>

#include <optional>

#include "storage/fault_store.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

using testing::first_pattern_mismatch;
using testing::make_pattern;

constexpr uint64_t kSeed = 31;
constexpr uint64_t kObjectSize = 100000;

class RetryStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch_->path());
    ASSERT_TRUE(files) << files.status().to_string();
    ASSERT_TRUE((*files)->put("obj", make_pattern(kSeed, 0, kObjectSize), IoContext{}).is_ok());
    faults_ = std::make_shared<FaultStore>(*files);
    use_policy(3);
  }

  // `retries` as RetryPolicy::retries; delays of about `base`.
  RetryPolicy& use_policy(std::optional<int> retries,
                          std::chrono::nanoseconds base = std::chrono::milliseconds(1)) {
    policy_ = RetryPolicy{};
    policy_.retries = retries;
    policy_.base_delay = base;
    policy_.max_delay = base * 4;
    policy_.attempt_reserve = base;
    store_ = std::make_shared<RetryStore>(faults_, policy_);
    return policy_;
  }
  void renew_store() { store_ = std::make_shared<RetryStore>(faults_, policy_); }

  // Reads [offset, offset + length) to its end; returns the bytes and the
  // status the stream ended with.
  std::pair<std::vector<std::byte>, Status> read_range(uint64_t offset, uint64_t length,
                                                       const IoContext& io = {}) {
    std::vector<std::byte> out;
    auto reader = store_->open_range("obj", offset, length, io);
    if (!reader) return {out, reader.status()};
    std::vector<std::byte> buffer(6000);
    for (;;) {
      Result<size_t> got = (*reader)->read(buffer);
      if (!got) return {out, got.status()};
      if (*got == 0) return {out, Status::ok()};
      out.insert(out.end(), buffer.begin(), buffer.begin() + static_cast<long>(*got));
    }
  }

  void set_faults(const char* spec) {
    Result<FaultSpec> parsed = FaultSpec::parse(spec);
    ASSERT_TRUE(parsed) << parsed.status().to_string();
    faults_->set(*parsed);
  }

  std::optional<testing::ScratchDir> scratch_;
  std::shared_ptr<FaultStore> faults_;
  RetryPolicy policy_;
  std::shared_ptr<RetryStore> store_;
};

TEST_F(RetryStoreTest, FailedOpensAreRetried) {
  set_faults("fail-open,times=2");
  auto [bytes, status] = read_range(100, 5000);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(bytes.size(), 5000u);
  EXPECT_EQ(first_pattern_mismatch(kSeed, 100, bytes), bytes.size());
  EXPECT_EQ(faults_->opens(), 3);
  EXPECT_EQ(store_->retries(), 2u);
}

TEST_F(RetryStoreTest, GivesUpAfterItsRetries) {
  use_policy(2);
  set_faults("fail-open,times=5");
  auto [bytes, status] = read_range(0, 5000);
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.to_string();
  EXPECT_NE(status.message().find("injected fault"), std::string::npos) << status.to_string();
  EXPECT_EQ(faults_->opens(), 3);  // the first attempt and two retries
}

TEST_F(RetryStoreTest, NoRetriesMeansOneAttempt) {
  use_policy(0);
  set_faults("fail-open,times=1");
  EXPECT_EQ(read_range(0, 10).second.code(), StatusCode::kUnavailable);
  EXPECT_EQ(faults_->opens(), 1);
}

TEST_F(RetryStoreTest, AStreamFailingMidWayResumesFromItsLastByte) {
  // Two streams fail after 10000 bytes each; the third runs clean.
  set_faults("fail-after=10000,times=2");
  auto [bytes, status] = read_range(50, 60000);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  ASSERT_EQ(bytes.size(), 60000u);
  // Resumed at the right offsets, or these bytes would not match.
  EXPECT_EQ(first_pattern_mismatch(kSeed, 50, bytes), bytes.size());
  EXPECT_EQ(faults_->opens(), 3);
}

TEST_F(RetryStoreTest, ProgressResetsTheCountOfFailures) {
  // Five failures, each after some progress: more than the 3 retries, but
  // never 3 in a row without a byte delivered.
  set_faults("fail-after=7000,times=5");
  auto [bytes, status] = read_range(0, kObjectSize);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  ASSERT_EQ(bytes.size(), kObjectSize);
  EXPECT_EQ(first_pattern_mismatch(kSeed, 0, bytes), bytes.size());
  EXPECT_EQ(faults_->opens(), 6);
}

TEST_F(RetryStoreTest, ATruncatedResponseIsResumed) {
  // The first stream's body ends at offset 30000, cleanly but early.
  set_faults("short=30000,times=1");
  auto [bytes, status] = read_range(1000, 50000);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  ASSERT_EQ(bytes.size(), 50000u);
  EXPECT_EQ(first_pattern_mismatch(kSeed, 1000, bytes), bytes.size());
  EXPECT_EQ(faults_->opens(), 2);
}

TEST_F(RetryStoreTest, AResponseThatStaysShortEndsEarlyForTheCallerToSee) {
  set_faults("short=30000");
  auto [bytes, status] = read_range(1000, 50000);
  EXPECT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(bytes.size(), 29000u);  // what exists; the caller compares with range_length
  EXPECT_EQ(faults_->opens(), 4);
}

TEST_F(RetryStoreTest, PermanentErrorsFailAtOnce) {
  auto reader = store_->open_range("no/such/key", 0, 10, IoContext{});
  ASSERT_FALSE(reader);
  EXPECT_EQ(reader.status().code(), StatusCode::kNotFound);
  EXPECT_EQ(faults_->opens(), 1);
  EXPECT_EQ(store_->retries(), 0u);
  EXPECT_EQ(store_->open_range("obj", kObjectSize + 10, 10, IoContext{}).status().code(),
            StatusCode::kOutOfRange);
  EXPECT_EQ(faults_->opens(), 2);
}

TEST_F(RetryStoreTest, AnObjectWhoseSizeChangesBetweenAttemptsIsCorrupt) {
  // The first stream reports a size the object does not have, then fails.
  set_faults("fail-after=100,size=200000,times=1");
  auto [bytes, status] = read_range(0, 5000);
  EXPECT_EQ(status.code(), StatusCode::kCorruption) << status.to_string();
  EXPECT_NE(status.message().find("changed between attempts"), std::string::npos)
      << status.to_string();
  EXPECT_EQ(bytes.size(), 100u);
}

TEST_F(RetryStoreTest, AnObjectRewrittenBetweenAttemptsIsCorrupt) {
  set_faults("fail-after=100,times=1");
  auto reader = store_->open_range("obj", 0, 5000, IoContext{});
  ASSERT_TRUE(reader) << reader.status().to_string();
  // Packed again, at the same size, while the first stream runs.
  Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch_->path());
  ASSERT_TRUE((*files)->put("obj", make_pattern(kSeed + 1, 0, kObjectSize), IoContext{}).is_ok());
  std::vector<std::byte> buffer(6000);
  Result<size_t> got = (*reader)->read(buffer);
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, 100u);
  got = (*reader)->read(buffer);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << got.status().to_string();
}

TEST_F(RetryStoreTest, PassesTheVersionOn) {
  Result<ObjectInfo> info = store_->stat_info("obj", IoContext{});
  ASSERT_TRUE(info) << info.status().to_string();
  EXPECT_FALSE(info->version.empty());
  auto reader = store_->open_range("obj", 0, 10, IoContext{});
  ASSERT_TRUE(reader);
  EXPECT_EQ((*reader)->object_version(), info->version);
}

TEST_F(RetryStoreTest, ByDefaultRetriesGoOnWhileTheDeadlineLeavesTime) {
  use_policy(std::nullopt);
  // Far more failures in a row than any fixed count would allow.
  set_faults("fail-open,times=60");
  const IoContext io{Clock::now() + std::chrono::seconds(60), {}};
  auto [bytes, status] = read_range(0, 5000, io);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(first_pattern_mismatch(kSeed, 0, bytes), 5000u);
  EXPECT_EQ(faults_->opens(), 61);
  EXPECT_EQ(store_->retries(), 60u);
}

TEST_F(RetryStoreTest, RetriesStopShortOfTheDeadlineWithTheFailureItself) {
  use_policy(std::nullopt, std::chrono::milliseconds(5));
  set_faults("fail-open");
  const IoContext io{Clock::now() + std::chrono::milliseconds(200), {}};
  auto [bytes, status] = read_range(0, 10, io);
  // Not a timeout: the failure that was retried, once, saying how often.
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.to_string();
  EXPECT_NE(status.message().find("injected fault"), std::string::npos) << status.to_string();
  EXPECT_NE(status.message().find("gave up after"), std::string::npos) << status.to_string();
  EXPECT_GE(faults_->opens(), 2);
}

TEST_F(RetryStoreTest, ACallWithoutADeadlineRetriesForItsWindow) {
  use_policy(std::nullopt).window_without_deadline = std::chrono::milliseconds(100);
  renew_store();
  set_faults("fail-open");
  auto [bytes, status] = read_range(0, 10);
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.to_string();
  EXPECT_GE(faults_->opens(), 2);
}

TEST_F(RetryStoreTest, ACountBoundsRetriesWithinTheDeadline) {
  use_policy(4);
  set_faults("fail-open");
  const IoContext io{Clock::now() + std::chrono::seconds(60), {}};
  auto [bytes, status] = read_range(0, 10, io);
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.to_string();
  EXPECT_NE(status.message().find("gave up after 4 retries"), std::string::npos)
      << status.to_string();
  EXPECT_EQ(faults_->opens(), 5);
}

TEST_F(RetryStoreTest, BackoffEndsAtTheDeadline) {
  // A backoff longer than what is left of the deadline: the sleep is cut
  // short, the attempt after it still made.
  use_policy(std::nullopt, std::chrono::seconds(10)).attempt_reserve = std::chrono::milliseconds(1);
  renew_store();
  set_faults("fail-open,times=1");
  const IoContext io{Clock::now() + std::chrono::milliseconds(300), {}};
  auto [bytes, status] = read_range(0, 10, io);
  EXPECT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(faults_->opens(), 2);
}

TEST_F(RetryStoreTest, BackoffEndsOnStop) {
  use_policy(1000000, std::chrono::seconds(10));
  set_faults("fail-open");
  std::stop_source stop;
  stop.request_stop();
  auto [bytes, status] = read_range(0, 10, IoContext{Clock::time_point::max(), stop.get_token()});
  EXPECT_EQ(status.code(), StatusCode::kCancelled) << status.to_string();
  EXPECT_EQ(faults_->opens(), 1);
}

TEST_F(RetryStoreTest, StatPutAndRemoveAreRetried) {
  set_faults("fail-open,times=1");
  Result<uint64_t> size = store_->stat("obj", IoContext{});
  ASSERT_TRUE(size) << size.status().to_string();
  EXPECT_EQ(*size, kObjectSize);
  EXPECT_EQ(store_->retries(), 1u);
  EXPECT_TRUE(store_->put("other", make_pattern(1, 0, 10), IoContext{}).is_ok());
  EXPECT_TRUE(store_->remove("other", IoContext{}).is_ok());
  EXPECT_EQ(store_->remove("other", IoContext{}).code(), StatusCode::kNotFound);
}

TEST_F(RetryStoreTest, DescribesItself) {
  EXPECT_EQ(store_->describe().rfind("retry(3) over faults(", 0), 0u) << store_->describe();
  use_policy(std::nullopt);
  EXPECT_EQ(store_->describe().rfind("retry(deadline) over faults(", 0), 0u) << store_->describe();
}

}  // namespace
}  // namespace lazyblock
