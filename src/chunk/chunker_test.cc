// Behaviour of the chunker under both fetch strategies, against a real file
// store wrapped in the fault-injecting layer. Object content is the
// self-checking pattern, so every read verifies itself.
#include "chunk/chunker.h"

#include <gtest/gtest.h>

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <functional>
#include <optional>
#include <random>
#include <thread>
#include <vector>

#include "common/byte_sink.h"
#include "common/mutex.h"
#include "common/unique_fd.h"
#include "common/units.h"
#include "storage/fault_store.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "testing/vector_sink.h"

namespace lazyblock {

// Names strategies in test output.
void PrintTo(FetchStrategy strategy, std::ostream* out) { *out << fetch_strategy_name(strategy); }

namespace {

using testing::first_pattern_mismatch;
using testing::make_pattern;

constexpr uint64_t kSeed = 7;
constexpr uint64_t kChunk = 4 * kMiB;
const std::string kKey = "build/memfile";

class ChunkerFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    std::filesystem::create_directories(dir_ / "root");
    std::filesystem::create_directories(dir_ / "cache");
    Result<std::shared_ptr<FileStore>> files = FileStore::open(dir_ / "root");
    ASSERT_TRUE(files) << files.status().to_string();
    files_ = *files;
    faults_ = std::make_shared<FaultStore>(files_);
  }

  void put_object(uint64_t size) {
    size_ = size;
    std::vector<std::byte> data = make_pattern(kSeed, 0, size);
    ASSERT_TRUE(files_->put(kKey, data, IoContext{}).is_ok());
  }

  ChunkerOptions options(std::chrono::nanoseconds timeout = std::chrono::seconds(30)) const {
    ChunkerOptions o;
    o.strategy = strategy_;
    o.fetch_timeout = timeout;
    o.cache_dir = dir_ / "cache";
    return o;
  }

  std::unique_ptr<Chunker> chunker(std::optional<uint64_t> size,
                                   std::chrono::nanoseconds timeout = std::chrono::seconds(30)) {
    Result<std::unique_ptr<Chunker>> made = make_chunker(faults_, kKey, size, options(timeout));
    EXPECT_TRUE(made) << made.status().to_string();
    return made ? std::move(made).value() : nullptr;
  }

  // Reads [offset, offset + length) and checks it against the pattern,
  // clipped at the object's end.
  Status read_and_check(Chunker& c, uint64_t offset, uint64_t length) {
    std::vector<std::byte> buffer(length);
    Result<size_t> got = c.read_at(buffer, offset);
    if (!got) return got.status();
    const uint64_t want = offset >= size_ ? 0 : std::min(length, size_ - offset);
    EXPECT_EQ(*got, want) << "read of " << length << " at " << offset;
    EXPECT_EQ(first_pattern_mismatch(kSeed, offset, std::span(buffer).first(*got)), *got)
        << "wrong bytes in read of " << length << " at " << offset;
    return Status::ok();
  }

  FetchStrategy strategy_ = FetchStrategy::kStreaming;
  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::shared_ptr<FileStore> files_;
  std::shared_ptr<FaultStore> faults_;
  uint64_t size_ = 0;
};

// The tests that hold for every strategy.
class ChunkerTest : public ChunkerFixture, public ::testing::WithParamInterface<FetchStrategy> {
 protected:
  void SetUp() override {
    strategy_ = GetParam();
    ChunkerFixture::SetUp();
  }
};

// Waits until `count` callers of `chunker` are waiting on fetches.
void wait_for_waiters(Chunker& chunker, uint64_t count) {
  while (chunker.stats().waiting != count) std::this_thread::yield();
}

// Waits until every stream of `chunker` has ended.
void wait_for_streams_to_end(Chunker& chunker) {
  while (chunker.stats().streams != 0) std::this_thread::yield();
}

// `read` (a read through a chunker with a short deadline, once a stall has
// cleared) asked again while it times out, up to 20 times. Under load a
// fetch can outlast a 200 ms deadline with no stall at all; what it
// delivered stays cached, so each try gets further. Anything but a timeout
// ends the tries at once.
Status until_not_timed_out(const std::function<Status()>& read) {
  Status status = read();
  for (int tries = 1; tries < 20 && status.code() == StatusCode::kTimeout; ++tries) {
    status = read();
  }
  return status;
}

TEST_P(ChunkerTest, ConcurrentReadersOfOverlappingAndDisjointRanges) {
  put_object(3 * kChunk + 12345);  // neither a block nor a chunk multiple
  auto c = chunker(size_);
  std::vector<std::thread> readers;
  std::atomic<int> failures{0};
  for (int t = 0; t < 8; ++t) {
    readers.emplace_back([&, t] {
      std::mt19937_64 rng(t);
      for (int i = 0; i < 40; ++i) {
        const uint64_t offset = rng() % (size_ + 1000);
        const uint64_t length = 1 + rng() % (i % 4 == 0 ? 2 * kChunk : 64 * kKiB);
        if (!read_and_check(*c, offset, length).is_ok()) ++failures;
      }
    });
  }
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(failures.load(), 0);
  // No byte was fetched twice, however the readers raced; with one stream
  // per chunk, every chunk was fetched exactly once.
  EXPECT_EQ(c->stats().bytes, size_);
  if (GetParam() == FetchStrategy::kSplit) {
    // The first stream of each chunk, and at most one cut per read.
    EXPECT_LE(c->stats().requests, 4u + 8 * 40);
  } else {
    EXPECT_EQ(c->stats().requests, 4u);
  }
}

TEST_P(ChunkerTest, ManyWaitersOnOneChunkShareOneFetch) {
  put_object(kChunk);
  auto c = chunker(size_);
  std::vector<std::thread> readers;
  std::atomic<int> failures{0};
  for (int t = 0; t < 32; ++t) {
    readers.emplace_back([&, t] {
      if (!read_and_check(*c, (static_cast<uint64_t>(t) * 131 % 1024) * 4096, 4096).is_ok()) {
        ++failures;
      }
    });
  }
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(failures.load(), 0);
  wait_for_streams_to_end(*c);
  EXPECT_TRUE(read_and_check(*c, 0, kChunk).is_ok());  // all cached by now
  EXPECT_EQ(c->stats().bytes, kChunk);
  if (GetParam() == FetchStrategy::kSplit) {
    // The first stream, and at most one cut per reader (streams that end
    // make room for new ones; SplitKeepsToItsStreamBound checks the bound).
    EXPECT_LE(c->stats().requests, 33u);
  } else {
    EXPECT_EQ(c->stats().requests, 1u);
  }
}

TEST_P(ChunkerTest, CancelEndsWaitsAtOnceAndRefusesNewFetches) {
  put_object(2 * kChunk);
  auto c = chunker(size_, std::chrono::seconds(60));
  ASSERT_TRUE(read_and_check(*c, kChunk, kChunk).is_ok());  // the second chunk is cached
  FaultSpec stall;
  stall.stall_after = 0;
  faults_->set(stall);
  std::thread waiting([&] {
    std::vector<std::byte> buffer(4096);
    Result<size_t> got = c->read_at(buffer, 0);
    ASSERT_FALSE(got);
    EXPECT_EQ(got.status().code(), StatusCode::kCancelled) << got.status().to_string();
  });
  faults_->wait_for_stalls(1);  // the read's stream is stalled: it waits on it
  c->cancel();
  waiting.join();  // long before the 60 s deadline
  // Cached bytes are still served; uncached ones are refused at once.
  EXPECT_TRUE(read_and_check(*c, kChunk + 100, 5000).is_ok());
  std::vector<std::byte> buffer(4096);
  Result<size_t> again = c->read_at(buffer, 8192);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.status().code(), StatusCode::kCancelled);
}

TEST_P(ChunkerTest, WaiterArrivingMidStreamJoinsTheFetch) {
  put_object(kChunk);
  FaultSpec stall;
  stall.stall_after = 1 * kMiB;
  faults_->set(stall);
  auto c = chunker(size_);
  std::thread first([&] { EXPECT_TRUE(read_and_check(*c, 3 * kMiB, 4096).is_ok()); });
  faults_->wait_for_stalls(1);  // the stream has delivered its first MiB
  if (GetParam() != FetchStrategy::kFull) {
    // Streaming publishes blocks as they arrive: this is served while the
    // stream is still stalled.
    EXPECT_TRUE(read_and_check(*c, 512 * kKiB, 4096).is_ok());
  }
  std::thread second([&] { EXPECT_TRUE(read_and_check(*c, 2 * kMiB, 8192).is_ok()); });
  faults_->release_stalls();
  first.join();
  second.join();
  wait_for_streams_to_end(*c);
  EXPECT_TRUE(read_and_check(*c, 0, kChunk).is_ok());  // all cached by now
  // Split may give each read that waits a stream of its own: the first
  // stream, then at most one cut for each of the three reads above.
  if (GetParam() == FetchStrategy::kSplit) {
    EXPECT_LE(c->stats().requests, 4u);
  } else {
    EXPECT_EQ(c->stats().requests, 1u);
  }
  EXPECT_EQ(c->stats().bytes, kChunk);
}

// A store layer whose streams deliver only up to a limit the test moves, so
// that a test can hold a fetch at a known byte.
class GatedStore final : public StoreLayer {
 public:
  using StoreLayer::StoreLayer;

  // Lets streams deliver their first `bytes` bytes.
  void open_to(uint64_t bytes) {
    MutexLock lock(mu_);
    limit_ = bytes;
    cv_.notify_all();
  }
  // Blocks until a stream has delivered `bytes` bytes and waits for more.
  void wait_until_held_at(uint64_t bytes) {
    MutexLock lock(mu_);
    cv_.wait(lock, [&]() REQUIRES(mu_) { return held_at_ == bytes; });
  }
  // Blocks until `count` streams wait at the gate at once.
  void wait_until_streams_held(int count) {
    MutexLock lock(mu_);
    cv_.wait(lock, [&]() REQUIRES(mu_) { return held_streams_ >= count; });
  }

  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override {
    Result<std::unique_ptr<RangeReader>> inner = StoreLayer::open_range(key, offset, length, io);
    if (!inner) return inner.status();
    return std::unique_ptr<RangeReader>(new Reader(*this, std::move(inner).value(), io));
  }

 private:
  class Reader final : public RangeReader {
   public:
    Reader(GatedStore& gate, std::unique_ptr<RangeReader> inner, IoContext io)
        : gate_(gate), inner_(std::move(inner)), io_(std::move(io)) {}
    Result<size_t> read(std::span<std::byte> buffer) override {
      uint64_t allowed = 0;
      {
        MutexLock lock(gate_.mu_);
        // The end of the range is reported as it comes: only bytes are held.
        if (delivered_ >= gate_.limit_ && delivered_ < inner_->range_length()) {
          gate_.held_at_ = delivered_;
          ++gate_.held_streams_;
          gate_.cv_.notify_all();
          gate_.cv_.wait(lock, io_.stop,
                         [&]() REQUIRES(gate_.mu_) { return delivered_ < gate_.limit_; });
          --gate_.held_streams_;
          if (io_.stop.stop_requested()) return Status::cancelled("gated read: stopped");
        }
        allowed = gate_.limit_ > delivered_ ? gate_.limit_ - delivered_ : buffer.size();
      }
      Result<size_t> got = inner_->read(buffer.first(std::min<uint64_t>(buffer.size(), allowed)));
      if (got) delivered_ += *got;
      return got;
    }
    uint64_t object_size() const override { return inner_->object_size(); }
    uint64_t range_length() const override { return inner_->range_length(); }

   private:
    GatedStore& gate_;
    const std::unique_ptr<RangeReader> inner_;
    const IoContext io_;
    uint64_t delivered_ = 0;
  };

  Mutex mu_;
  StoppableCondVar cv_;
  uint64_t limit_ GUARDED_BY(mu_) = 0;
  uint64_t held_at_ GUARDED_BY(mu_) = UINT64_MAX;
  int held_streams_ GUARDED_BY(mu_) = 0;
};

TEST_F(ChunkerFixture, StreamingWakesEachWaiterAsTheStreamPassesIt) {
  strategy_ = FetchStrategy::kStreaming;
  put_object(kChunk);
  auto gate = std::make_shared<GatedStore>(files_);
  Result<std::unique_ptr<Chunker>> made = make_chunker(gate, kKey, size_, options());
  ASSERT_TRUE(made);
  Chunker& c = **made;
  std::atomic<bool> far_done{false};
  std::thread far([&] {
    EXPECT_TRUE(read_and_check(c, 3 * kMiB, 4096).is_ok());
    far_done = true;
  });
  gate->wait_until_held_at(0);
  wait_for_waiters(c, 1);
  std::thread near([&] { EXPECT_TRUE(read_and_check(c, 1 * kMiB, 4096).is_ok()); });
  wait_for_waiters(c, 2);
  // Both wait on the one stream. Letting it reach 2 MiB completes the near
  // waiter; the far one still waits.
  gate->open_to(2 * kMiB);
  near.join();
  EXPECT_FALSE(far_done.load());
  EXPECT_EQ(c.stats().waiting, 1u);
  gate->open_to(kChunk);
  far.join();
  EXPECT_EQ(c.stats().requests, 1u);
}

TEST_F(ChunkerFixture, FullWakesWaitersOnlyOnceTheWholeChunkIsIn) {
  strategy_ = FetchStrategy::kFull;
  put_object(kChunk);
  auto gate = std::make_shared<GatedStore>(files_);
  Result<std::unique_ptr<Chunker>> made = make_chunker(gate, kKey, size_, options());
  ASSERT_TRUE(made);
  Chunker& c = **made;
  std::thread near([&] { EXPECT_TRUE(read_and_check(c, 0, 4096).is_ok()); });
  wait_for_waiters(c, 1);
  gate->open_to(kChunk - 1);
  gate->wait_until_held_at(kChunk - 1);
  // All but the last byte is in, and the near waiter still waits.
  EXPECT_EQ(c.stats().waiting, 1u);
  gate->open_to(kChunk);
  near.join();
  EXPECT_EQ(c.stats().waiting, 0u);
}

// Tests that follow one stream through a chunk: full and streaming.
class SingleStreamChunkerTest : public ChunkerTest {};

TEST_P(SingleStreamChunkerTest, FetchFailingHalfWayFailsItsWaitersAndCachesOnlyWhatArrived) {
  put_object(kChunk);
  // files <- gate (holds the stream until every waiter has joined) <- faults
  auto gate = std::make_shared<GatedStore>(files_);
  FaultSpec fail;
  fail.fail_after = 2 * kMiB + 100;
  auto faults = std::make_shared<FaultStore>(gate, fail);
  Result<std::unique_ptr<Chunker>> made = make_chunker(faults, kKey, size_, options());
  ASSERT_TRUE(made);
  Chunker& c = **made;
  std::vector<std::thread> readers;
  std::atomic<int> errors{0};
  for (uint64_t offset : {3 * kMiB, 3 * kMiB + 512 * kKiB, kChunk - 4096}) {
    readers.emplace_back([&, offset] {
      std::vector<std::byte> buffer(4096);
      Result<size_t> got = c.read_at(buffer, offset);
      EXPECT_FALSE(got);
      if (!got) {
        EXPECT_EQ(got.status().code(), StatusCode::kUnavailable) << got.status().to_string();
        EXPECT_NE(got.status().message().find(kKey), std::string::npos) << got.status().to_string();
        ++errors;
      }
    });
  }
  // A waiter whose bytes arrive before the failure is served.
  readers.emplace_back([&] { EXPECT_TRUE(read_and_check(c, 1 * kMiB, 4096).is_ok()); });
  wait_for_waiters(c, 4);
  gate->open_to(kChunk);
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(errors.load(), 3);
  EXPECT_EQ(c.stats().requests, 1u);

  // The bytes before the failure arrived whole: they are served as they are.
  EXPECT_TRUE(read_and_check(c, 2 * kMiB - 4096, 4096).is_ok());
  EXPECT_EQ(c.stats().requests, 1u);

  // Once the fault clears, a read fetches again, from the first block that
  // did not arrive whole (2 MiB): nothing past the failure was marked cached.
  faults->set(FaultSpec{});
  const uint64_t bytes = c.stats().bytes;
  EXPECT_TRUE(read_and_check(c, 3 * kMiB, 4096).is_ok());
  EXPECT_TRUE(read_and_check(c, 0, kChunk).is_ok());  // waits for the fetch to end
  EXPECT_EQ(c.stats().requests, 2u);
  EXPECT_EQ(c.stats().bytes - bytes, 2 * kMiB);
}

TEST_P(SingleStreamChunkerTest, StallPastTheDeadlineTimesOutThenRecovers) {
  put_object(kChunk);
  FaultSpec stall;
  stall.stall_after = 1 * kMiB;
  faults_->set(stall);
  auto c = chunker(size_, std::chrono::milliseconds(200));
  std::vector<std::byte> buffer(4096);
  Result<size_t> got = c->read_at(buffer, 2 * kMiB);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kTimeout) << got.status().to_string();
  faults_->set(FaultSpec{});
  const Status recovered = until_not_timed_out([&] { return read_and_check(*c, 2 * kMiB, 4096); });
  EXPECT_TRUE(recovered.is_ok()) << recovered.to_string();
}

TEST_P(ChunkerTest, ReadsAcrossChunkBoundariesAndTheEnd) {
  put_object(2 * kChunk + 5000);
  auto c = chunker(size_);
  EXPECT_TRUE(read_and_check(*c, kChunk - 100, 200).is_ok());
  EXPECT_TRUE(read_and_check(*c, kChunk - 1, 2 * kChunk).is_ok());  // clipped at the end
  EXPECT_TRUE(read_and_check(*c, size_ - 10, 100).is_ok());         // 10 bytes
  EXPECT_TRUE(read_and_check(*c, size_, 100).is_ok());              // nothing
  EXPECT_TRUE(read_and_check(*c, size_ + kChunk, 100).is_ok());     // nothing
  Result<std::span<const std::byte>> tail = c->slice(size_ - 3000, 1 << 20);
  ASSERT_TRUE(tail);
  EXPECT_EQ(tail->size(), 3000u);
  EXPECT_EQ(first_pattern_mismatch(kSeed, size_ - 3000, *tail), 3000u);
}

TEST_P(ChunkerTest, ObjectSmallerThanABlock) {
  put_object(100);
  auto c = chunker(std::nullopt);
  EXPECT_TRUE(read_and_check(*c, 0, 4096).is_ok());
  EXPECT_TRUE(read_and_check(*c, 50, 10).is_ok());
  EXPECT_EQ(c->stats().requests, 1u);
}

TEST_P(ChunkerTest, EmptyObject) {
  put_object(0);
  auto c = chunker(std::nullopt);
  EXPECT_TRUE(read_and_check(*c, 0, 4096).is_ok());
  testing::VectorSink sink;
  EXPECT_TRUE(c->write_to(sink).is_ok());
  EXPECT_TRUE(sink.bytes.empty());
}

TEST_P(ChunkerTest, LazySizeIsLearnedFromTheFirstFetch) {
  put_object(kChunk + 4097);
  auto c = chunker(std::nullopt);
  EXPECT_TRUE(read_and_check(*c, kChunk + 10, 10000).is_ok());
  Result<uint64_t> size = c->size();
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, size_);
  EXPECT_EQ(c->stats().requests, 1u);  // no separate size request
}

TEST_P(ChunkerTest, LazySizeWhenTheFirstReadIsPastTheEnd) {
  put_object(kChunk + 4097);
  auto c = chunker(std::nullopt);
  EXPECT_TRUE(read_and_check(*c, 5 * kChunk, 100).is_ok());  // nothing there
  EXPECT_TRUE(read_and_check(*c, kChunk, 8192).is_ok());
}

TEST_P(ChunkerTest, SizeOfAFreshChunkerAsksTheStoreNotTheData) {
  put_object(3 * kChunk + 1);
  auto c = chunker(std::nullopt);
  Result<uint64_t> size = c->size();
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, size_);
  EXPECT_EQ(c->stats().bytes, 0u);
}

// Review regression: write_to on a chunker that had served no read exported
// zero bytes, because the size was not yet known.
TEST_P(ChunkerTest, WriteToOnAFreshChunkerExportsTheWholeObject) {
  put_object(3 * kChunk + 777);
  auto c = chunker(std::nullopt);
  testing::VectorSink sink;
  ASSERT_TRUE(c->write_to(sink).is_ok());
  ASSERT_EQ(sink.bytes.size(), size_);
  EXPECT_EQ(first_pattern_mismatch(kSeed, 0, sink.bytes), size_);
}

// write_range_to, as cat uses it (drop_behind, a file descriptor's sink):
// ranges across a chunk boundary and past the end, written in order from
// the cache, each range's blocks given back once written.
TEST_P(ChunkerTest, WriteRangeToWritesRangesInOrderClippedAtTheEndAndGivesThemBack) {
  put_object(2 * kChunk + 777);
  ChunkerOptions o = options();
  o.drop_behind = true;
  Result<std::unique_ptr<Chunker>> made = make_chunker(faults_, kKey, std::nullopt, o);
  ASSERT_TRUE(made) << made.status().to_string();
  Chunker& c = **made;
  const std::filesystem::path out = dir_ / "out";
  UniqueFd fd(::open(out.c_str(), O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0600));
  ASSERT_TRUE(fd) << std::strerror(errno);
  FdSink sink(fd.get(), out.string());
  uint64_t position = 0;
  for (const uint64_t length : {kChunk / 2 + 4096, kChunk, kChunk}) {
    Result<size_t> written = c.write_range_to(sink, position, length);
    ASSERT_TRUE(written) << written.status().to_string();
    EXPECT_EQ(*written, std::min(length, size_ - position)) << "at " << position;
    position += *written;
  }
  Result<size_t> at_end = c.write_range_to(sink, position, kChunk);
  ASSERT_TRUE(at_end) << at_end.status().to_string();
  EXPECT_EQ(*at_end, 0u);
  std::vector<std::byte> bytes(size_ + 1);
  ASSERT_EQ(::pread(fd.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(size_));
  EXPECT_EQ(first_pattern_mismatch(kSeed, 0, std::span(bytes).first(size_)), size_);
  EXPECT_FALSE(c.cached_slice(0, 4096)) << "a written block was not given back";
}

// Review regression: a zero-length read on a fresh chunker crashed.
TEST_P(ChunkerTest, ZeroLengthReadOnAFreshChunkerFetchesNothing) {
  put_object(kChunk);
  auto c = chunker(std::nullopt);
  Result<size_t> got = c->read_at(std::span<std::byte>(), 12345);
  ASSERT_TRUE(got);
  EXPECT_EQ(*got, 0u);
  Result<std::span<const std::byte>> view = c->slice(0, 0);
  ASSERT_TRUE(view);
  EXPECT_TRUE(view->empty());
  EXPECT_EQ(c->stats().requests, 0u);
}

TEST_P(ChunkerTest, MissingObjectIsNotFound) {
  auto c = chunker(std::nullopt);
  std::vector<std::byte> buffer(10);
  Result<size_t> got = c->read_at(buffer, 0);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kNotFound);
  EXPECT_NE(got.status().message().find("object not found: " + kKey), std::string::npos)
      << got.status().to_string();
}

TEST_P(ChunkerTest, TruncatedStreamIsAnErrorAndCachesNothingPastIt) {
  put_object(kChunk);
  FaultSpec truncated;
  truncated.short_object = kMiB + 10;  // the body ends early; the size claims 4 MiB
  faults_->set(truncated);
  auto c = chunker(std::nullopt);
  std::vector<std::byte> buffer(4096);
  Result<size_t> got = c->read_at(buffer, 2 * kMiB);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << got.status().to_string();
  wait_for_streams_to_end(*c);  // under split, a sibling stream may still be failing
  faults_->set(FaultSpec{});
  const uint64_t bytes = c->stats().bytes;
  EXPECT_TRUE(read_and_check(*c, 0, kChunk).is_ok());
  EXPECT_EQ(c->stats().bytes - bytes, kChunk - kMiB);
}

TEST_P(ChunkerTest, ObjectReportedLargerThanItIsIsAnError) {
  put_object(kChunk);
  FaultSpec wrong;
  wrong.reported_size = kChunk + kMiB;
  faults_->set(wrong);
  auto c = chunker(std::nullopt);
  // The first chunk exists whole; the second, which the size promises, does not.
  EXPECT_TRUE(read_and_check(*c, 0, 4096).is_ok());
  std::vector<std::byte> buffer(4096);
  Result<size_t> got = c->read_at(buffer, kChunk + 4096);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << got.status().to_string();
  EXPECT_NE(got.status().message().find("ended after 0 of"), std::string::npos)
      << got.status().to_string();
}

TEST_P(ChunkerTest, ObjectReportedSmallerThanItIsIsAnError) {
  put_object(kChunk);
  FaultSpec wrong;
  wrong.reported_size = kChunk - kMiB;
  faults_->set(wrong);
  auto c = chunker(kChunk);  // we were told 4 MiB; the store now says 3
  std::vector<std::byte> buffer(4096);
  Result<size_t> got = c->read_at(buffer, 0);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << got.status().to_string();
  EXPECT_NE(got.status().message().find("changed size"), std::string::npos);
}

TEST_P(ChunkerTest, FailedOpenReachesEveryWaiter) {
  put_object(kChunk);
  FaultSpec fail;
  fail.fail_open = true;
  faults_->set(fail);
  auto c = chunker(size_);
  std::vector<std::thread> readers;
  std::atomic<int> errors{0};
  for (int t = 0; t < 4; ++t) {
    readers.emplace_back([&, t] {
      std::vector<std::byte> buffer(4096);
      if (!c->read_at(buffer, static_cast<uint64_t>(t) * kMiB)) ++errors;
    });
  }
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(errors.load(), 4);
  faults_->set(FaultSpec{});
  EXPECT_TRUE(read_and_check(*c, 0, kChunk).is_ok());
}

// A store whose streams never open: open_range waits for the fetch's stop,
// ignoring its deadline, as a hung network call might.
class HangingStore final : public StoreLayer {
 public:
  using StoreLayer::StoreLayer;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t, uint64_t,
                                                  const IoContext& io) override {
    std::mutex mu;
    std::condition_variable_any cv;
    std::unique_lock lock(mu);
    cv.wait(lock, io.stop, [] { return false; });
    return Status::cancelled("open " + key + ": stopped");
  }
};

TEST_P(ChunkerTest, ACallerGivesUpAtTheDeadlineEvenIfTheStoreHangs) {
  put_object(kChunk);
  Result<std::unique_ptr<Chunker>> made = make_chunker(
      std::make_shared<HangingStore>(files_), kKey, size_, options(std::chrono::milliseconds(100)));
  ASSERT_TRUE(made);
  std::vector<std::byte> buffer(4096);
  Result<size_t> got = (*made)->read_at(buffer, 0);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kTimeout) << got.status().to_string();
  // The fetch is still hanging in the store: destroying the chunker stops it
  // and returns (a hang here fails the test by its CTest timeout).
  made->reset();
}

// A store layer that records where each range stream starts.
class RecordingStore final : public StoreLayer {
 public:
  using StoreLayer::StoreLayer;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override {
    {
      MutexLock lock(mu_);
      opened_at_.push_back(offset);
    }
    return StoreLayer::open_range(key, offset, length, io);
  }
  // The chunks whose first byte a stream started at, sorted.
  std::vector<uint64_t> chunks_opened() {
    MutexLock lock(mu_);
    std::vector<uint64_t> chunks;
    for (uint64_t offset : opened_at_) {
      if (offset % kChunk == 0) chunks.push_back(offset / kChunk);
    }
    std::sort(chunks.begin(), chunks.end());
    return chunks;
  }

 private:
  Mutex mu_;
  std::vector<uint64_t> opened_at_ GUARDED_BY(mu_);
};

class ReadaheadTest : public ChunkerTest {
 protected:
  // A chunker over a recording store, with readahead on or off.
  std::unique_ptr<Chunker> recorded_chunker(bool readahead) {
    recorder_ = std::make_shared<RecordingStore>(files_);
    ChunkerOptions o = options();
    o.readahead = readahead;
    Result<std::unique_ptr<Chunker>> made = make_chunker(recorder_, kKey, size_, o);
    EXPECT_TRUE(made) << made.status().to_string();
    return made ? std::move(made).value() : nullptr;
  }
  std::shared_ptr<RecordingStore> recorder_;
};

TEST_P(ReadaheadTest, SequentialReadsFetchTheChunksAhead) {
  put_object(8 * kChunk);
  auto c = recorded_chunker(/*readahead=*/true);
  // Eight sequential 64 KiB reads, all inside chunk 0: the window grows from
  // 1 MiB by doubling to 128 MiB, far past chunk 0.
  for (uint64_t offset = 0; offset < 8 * 64 * kKiB; offset += 64 * kKiB) {
    ASSERT_TRUE(read_and_check(*c, offset, 64 * kKiB).is_ok());
  }
  wait_for_streams_to_end(*c);
  // Readahead runs at most 2 x parallel chunks ahead: all 8 here.
  EXPECT_EQ(recorder_->chunks_opened(), (std::vector<uint64_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_TRUE(read_and_check(*c, 0, size_).is_ok());
  EXPECT_EQ(c->stats().bytes, size_);  // nothing fetched twice
}

TEST_P(ReadaheadTest, SequentialReadsWithReadaheadOffFetchOnlyWhatIsRead) {
  put_object(8 * kChunk);
  auto c = recorded_chunker(/*readahead=*/false);
  for (uint64_t offset = 0; offset < 8 * 64 * kKiB; offset += 64 * kKiB) {
    ASSERT_TRUE(read_and_check(*c, offset, 64 * kKiB).is_ok());
  }
  wait_for_streams_to_end(*c);
  EXPECT_EQ(recorder_->chunks_opened(), (std::vector<uint64_t>{0}));
}

TEST_P(ReadaheadTest, RandomReadsDoNotReadAhead) {
  put_object(8 * kChunk);
  auto c = recorded_chunker(/*readahead=*/true);
  // Each read starts elsewhere than the last ended, even where chunks follow
  // each other (chunk 2, then chunk 3).
  for (uint64_t chunk : {5, 2, 3, 0}) {
    ASSERT_TRUE(read_and_check(*c, chunk * kChunk + 8192, 4096).is_ok());
  }
  wait_for_streams_to_end(*c);
  EXPECT_EQ(recorder_->chunks_opened(), (std::vector<uint64_t>{0, 2, 3, 5}));
}

TEST_P(ReadaheadTest, ARandomReadEndsASequentialRun) {
  put_object(8 * kChunk);
  auto c = recorded_chunker(/*readahead=*/true);
  // Two sequential reads at the end of chunk 5 (window 1 MiB after the
  // second, which reaches into chunk 6), then a jump back: the window starts
  // over, so the reads at chunk 1 reach no further than chunk 1.
  ASSERT_TRUE(read_and_check(*c, 6 * kChunk - 8192, 4096).is_ok());
  ASSERT_TRUE(read_and_check(*c, 6 * kChunk - 4096, 4096).is_ok());
  wait_for_streams_to_end(*c);
  EXPECT_EQ(recorder_->chunks_opened(), (std::vector<uint64_t>{5, 6}));
  ASSERT_TRUE(read_and_check(*c, 1 * kChunk, 4096).is_ok());
  ASSERT_TRUE(read_and_check(*c, 1 * kChunk + 4096, 4096).is_ok());
  wait_for_streams_to_end(*c);
  EXPECT_EQ(recorder_->chunks_opened(), (std::vector<uint64_t>{1, 5, 6}));
}

TEST_P(ReadaheadTest, InterleavedSequentialRunsEachReadAhead) {
  put_object(32 * kChunk);
  auto c = recorded_chunker(/*readahead=*/true);
  // Two readers, one from chunk 0 and one from chunk 16, taking turns (as
  // nbdcopy's threads copy their halves of a disk): each read continues its
  // own run, so both windows grow past their first chunks.
  for (uint64_t offset = 0; offset < 8 * 64 * kKiB; offset += 64 * kKiB) {
    ASSERT_TRUE(read_and_check(*c, offset, 64 * kKiB).is_ok());
    ASSERT_TRUE(read_and_check(*c, 16 * kChunk + offset, 64 * kKiB).is_ok());
  }
  wait_for_streams_to_end(*c);
  const std::vector<uint64_t> opened = recorder_->chunks_opened();
  EXPECT_TRUE(std::count(opened.begin(), opened.end(), 1)) << ::testing::PrintToString(opened);
  EXPECT_TRUE(std::count(opened.begin(), opened.end(), 17)) << ::testing::PrintToString(opened);
  EXPECT_EQ(std::adjacent_find(opened.begin(), opened.end()), opened.end())
      << "a chunk fetched twice: " << ::testing::PrintToString(opened);
}

TEST_P(ReadaheadTest, PrefetchFetchesTheRangesAskedForWithoutWaiting) {
  put_object(8 * kChunk);
  auto c = recorded_chunker(/*readahead=*/false);
  c->prefetch(3 * kChunk, 10);
  c->prefetch(5 * kChunk, 2 * kChunk - 4096);  // chunks 5 and 6
  c->prefetch(100 * kChunk, kChunk);           // past the end: ignored
  wait_for_streams_to_end(*c);
  EXPECT_EQ(recorder_->chunks_opened(), (std::vector<uint64_t>{3, 5, 6}));
  EXPECT_EQ(c->stats().bytes, 3 * kChunk);  // whole chunks, as every fetch
  // Now cached: reading them asks the store for nothing.
  EXPECT_TRUE(read_and_check(*c, 3 * kChunk, kChunk).is_ok());
  EXPECT_TRUE(read_and_check(*c, 5 * kChunk, 2 * kChunk).is_ok());
  EXPECT_EQ(c->stats().requests, 3u);
}

TEST_P(ReadaheadTest, PrefetchOnAChunkerThatDoesNotKnowTheSizeYet) {
  put_object(3 * kChunk);
  recorder_ = std::make_shared<RecordingStore>(files_);
  ChunkerOptions o = options();
  o.readahead = false;
  Result<std::unique_ptr<Chunker>> made = make_chunker(recorder_, kKey, std::nullopt, o);
  ASSERT_TRUE(made);
  (*made)->prefetch(2 * kChunk, kChunk);
  wait_for_streams_to_end(**made);
  EXPECT_EQ(recorder_->chunks_opened(), (std::vector<uint64_t>{2}));
  EXPECT_EQ(*(*made)->size(), size_);
}

// Split: a far reader gets a stream of its own, cut from the running one.
class SplitChunkerTest : public ChunkerFixture {
 protected:
  void SetUp() override {
    strategy_ = FetchStrategy::kSplit;
    ChunkerFixture::SetUp();
    put_object(kChunk);
    // files <- gate (holds streams at a known byte) <- faults
    gate_ = std::make_shared<GatedStore>(files_);
    split_faults_ = std::make_shared<FaultStore>(gate_);
    Result<std::unique_ptr<Chunker>> made = make_chunker(split_faults_, kKey, size_, options());
    ASSERT_TRUE(made);
    chunker_ = std::move(made).value();
  }

  // Starts a reader of one block at `offset`; it records its status.
  std::thread read_block(uint64_t offset, Status* status) {
    return std::thread(
        [this, offset, status] { *status = read_and_check(*chunker_, offset, 4096); });
  }

  std::shared_ptr<GatedStore> gate_;
  std::shared_ptr<FaultStore> split_faults_;
  std::unique_ptr<Chunker> chunker_;
};

TEST_F(SplitChunkerTest, AFarReaderGetsItsOwnStreamAndNothingIsFetchedTwice) {
  Status near_status, far_status;
  std::thread near = read_block(4096, &near_status);
  wait_for_waiters(*chunker_, 1);
  gate_->wait_until_held_at(0);
  std::thread far = read_block(3 * kMiB, &far_status);
  gate_->wait_until_streams_held(2);  // the far reader's stream is open
  EXPECT_EQ(chunker_->stats().requests, 2u);
  gate_->open_to(kChunk);
  near.join();
  far.join();
  EXPECT_TRUE(near_status.is_ok()) << near_status.to_string();
  EXPECT_TRUE(far_status.is_ok()) << far_status.to_string();
  wait_for_streams_to_end(*chunker_);
  EXPECT_TRUE(read_and_check(*chunker_, 0, kChunk).is_ok());  // all cached by now
  EXPECT_EQ(chunker_->stats().requests, 2u);
  EXPECT_EQ(chunker_->stats().bytes, kChunk);
}

TEST_F(SplitChunkerTest, ReadersOnBothSidesOfASplitBoundary) {
  Status statuses[4];
  std::vector<std::thread> readers;
  readers.push_back(read_block(0, &statuses[0]));
  wait_for_waiters(*chunker_, 1);
  gate_->wait_until_held_at(0);
  readers.push_back(read_block(3 * kMiB, &statuses[1]));  // splits at 3 MiB
  wait_for_waiters(*chunker_, 2);
  readers.push_back(read_block(3 * kMiB - 4096, &statuses[2]));  // just below the cut
  readers.push_back(read_block(3 * kMiB + 8192, &statuses[3]));  // just above it
  wait_for_waiters(*chunker_, 4);
  gate_->open_to(kChunk);
  for (std::thread& t : readers) t.join();
  for (const Status& status : statuses) EXPECT_TRUE(status.is_ok()) << status.to_string();
  wait_for_streams_to_end(*chunker_);
  EXPECT_TRUE(read_and_check(*chunker_, 0, kChunk).is_ok());  // all cached by now
  EXPECT_EQ(chunker_->stats().bytes, kChunk);
  EXPECT_LE(chunker_->stats().requests, 4u);
}

TEST_F(SplitChunkerTest, ASplitStreamFailingWhileItsSiblingSucceeds) {
  Status near_status, far_status;
  std::thread near = read_block(4096, &near_status);
  gate_->wait_until_held_at(0);  // the first stream is open, without faults
  FaultSpec fail;
  fail.fail_after = 0;  // streams opened from now on fail at once
  split_faults_->set(fail);
  // The far reader's stream fails while the first still waits at the gate.
  std::thread far = read_block(3 * kMiB + 4096, &far_status);
  far.join();
  EXPECT_EQ(far_status.code(), StatusCode::kUnavailable) << far_status.to_string();
  gate_->open_to(kChunk);
  near.join();
  EXPECT_TRUE(near_status.is_ok()) << near_status.to_string();
  // Once the fault clears, the far block is fetched again; still no byte twice.
  split_faults_->set(FaultSpec{});
  EXPECT_TRUE(read_and_check(*chunker_, 0, kChunk).is_ok());
  EXPECT_EQ(chunker_->stats().bytes, kChunk);
}

TEST_F(SplitChunkerTest, BothStreamsFailing) {
  FaultSpec fail;
  fail.fail_after = 0;
  split_faults_->set(fail);
  gate_->open_to(kChunk);
  Status near_status, far_status;
  std::thread near = read_block(4096, &near_status);
  std::thread far = read_block(3 * kMiB + 4096, &far_status);
  near.join();
  far.join();
  EXPECT_EQ(near_status.code(), StatusCode::kUnavailable) << near_status.to_string();
  EXPECT_EQ(far_status.code(), StatusCode::kUnavailable) << far_status.to_string();
  wait_for_streams_to_end(*chunker_);
  split_faults_->set(FaultSpec{});
  EXPECT_TRUE(read_and_check(*chunker_, 0, kChunk).is_ok());
}

TEST_F(ChunkerFixture, SplitStreamsStallingPastTheDeadline) {
  strategy_ = FetchStrategy::kSplit;
  put_object(kChunk);
  FaultSpec stall;
  stall.stall_after = 0;
  faults_->set(stall);
  auto c = chunker(size_, std::chrono::milliseconds(200));
  Status near_status, far_status;
  std::thread near([&] { near_status = read_and_check(*c, 0, 4096); });
  std::thread far([&] { far_status = read_and_check(*c, 3 * kMiB, 4096); });
  near.join();
  far.join();
  EXPECT_EQ(near_status.code(), StatusCode::kTimeout) << near_status.to_string();
  EXPECT_EQ(far_status.code(), StatusCode::kTimeout) << far_status.to_string();
  wait_for_streams_to_end(*c);
  faults_->set(FaultSpec{});
  const Status recovered = until_not_timed_out([&] { return read_and_check(*c, 0, kChunk); });
  EXPECT_TRUE(recovered.is_ok()) << recovered.to_string();
}

TEST_F(ChunkerFixture, SplitKeepsToItsStreamBound) {
  strategy_ = FetchStrategy::kSplit;
  put_object(kChunk);
  auto gate = std::make_shared<GatedStore>(files_);
  ChunkerOptions o = options();
  o.max_streams_per_chunk = 3;
  Result<std::unique_ptr<Chunker>> made = make_chunker(gate, kKey, size_, o);
  ASSERT_TRUE(made);
  Chunker& c = **made;
  std::vector<std::thread> readers;
  std::atomic<int> failures{0};
  for (uint64_t i = 0; i < 16; ++i) {
    readers.emplace_back([&, i] {
      if (!read_and_check(c, (1023 - i * 61) * 4096, 4096).is_ok()) ++failures;
    });
  }
  wait_for_waiters(c, 16);
  EXPECT_LE(c.stats().requests, 3u);
  gate->open_to(kChunk);
  for (std::thread& t : readers) t.join();
  EXPECT_EQ(failures.load(), 0);
  wait_for_streams_to_end(c);
  EXPECT_TRUE(read_and_check(c, 0, kChunk).is_ok());  // all cached by now
  EXPECT_LE(c.stats().requests, 3u);
  EXPECT_EQ(c.stats().bytes, kChunk);
}

std::string strategy_name(const ::testing::TestParamInfo<FetchStrategy>& info) {
  return std::string(fetch_strategy_name(info.param));
}

INSTANTIATE_TEST_SUITE_P(Strategies, ChunkerTest,
                         ::testing::Values(FetchStrategy::kFull, FetchStrategy::kStreaming,
                                           FetchStrategy::kSplit),
                         strategy_name);
INSTANTIATE_TEST_SUITE_P(Strategies, ReadaheadTest,
                         ::testing::Values(FetchStrategy::kFull, FetchStrategy::kStreaming,
                                           FetchStrategy::kSplit),
                         strategy_name);
INSTANTIATE_TEST_SUITE_P(Strategies, SingleStreamChunkerTest,
                         ::testing::Values(FetchStrategy::kFull, FetchStrategy::kStreaming),
                         strategy_name);

}  // namespace
}  // namespace lazyblock
