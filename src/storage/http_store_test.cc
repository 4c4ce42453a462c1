// The http store against a real nginx on 127.0.0.1, serving well and badly.
#include "storage/http_store.h"

#include <gtest/gtest.h>

#include <fstream>
#include <set>
#include <sstream>
#include <thread>

#include "common/units.h"
#include "storage/retry_store.h"
#include "testing/nginx_server.h"
#include "testing/pattern.h"

namespace lazyblock {
namespace {

using testing::first_pattern_mismatch;
using testing::make_pattern;

constexpr uint64_t kSeed = 17;
constexpr uint64_t kObjectSize = 3 * kMiB + 1234;
const std::string kKey = "builds/b1/memfile";

class HttpStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<std::unique_ptr<testing::NginxServer>> server = testing::NginxServer::start();
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
    const std::filesystem::path file = server_->docroot() / kKey;
    std::filesystem::create_directories(file.parent_path());
    const std::vector<std::byte> data = make_pattern(kSeed, 0, kObjectSize);
    std::ofstream(file, std::ios::binary)
        .write(reinterpret_cast<const char*>(data.data()),
               static_cast<std::streamsize>(data.size()));
    store_ = open("");
  }

  std::shared_ptr<HttpStore> open(const std::string& prefix, HttpClientOptions options = {}) {
    Result<std::shared_ptr<HttpStore>> store = HttpStore::open(server_->url() + prefix, options);
    EXPECT_TRUE(store) << store.status().to_string();
    return store ? *store : nullptr;
  }

  // Reads the range to its end; returns the bytes and how the stream ended.
  static std::pair<std::vector<std::byte>, Status> read_range(ObjectStore& store, uint64_t offset,
                                                              uint64_t length,
                                                              const IoContext& io = {}) {
    std::vector<std::byte> out;
    auto reader = store.open_range(kKey, offset, length, io);
    if (!reader) return {out, reader.status()};
    std::vector<std::byte> buffer(100000);
    for (;;) {
      Result<size_t> got = (*reader)->read(buffer);
      if (!got) return {out, got.status()};
      if (*got == 0) break;
      out.insert(out.end(), buffer.begin(), buffer.begin() + static_cast<long>(*got));
    }
    if (out.size() != (*reader)->range_length()) {
      return {out, Status::corruption("short: " + std::to_string(out.size()))};
    }
    return {out, Status::ok()};
  }

  std::unique_ptr<testing::NginxServer> server_;
  std::shared_ptr<HttpStore> store_;
};

TEST_F(HttpStoreTest, TheVersionIsTheETagOfTheAnswer) {
  Result<ObjectInfo> info = store_->stat_info(kKey, IoContext{});
  ASSERT_TRUE(info) << info.status().to_string();
  EXPECT_EQ(info->size, kObjectSize);
  EXPECT_EQ(info->version.rfind("ETag ", 0), 0u) << info->version;
  auto reader = store_->open_range(kKey, 100, 1000, IoContext{});
  ASSERT_TRUE(reader) << reader.status().to_string();
  EXPECT_EQ((*reader)->object_version(), info->version) << "a HEAD and a GET agree";
  // Written again (another modification time): another version.
  const std::filesystem::path file = server_->docroot() / kKey;
  std::filesystem::last_write_time(file,
                                   std::filesystem::last_write_time(file) - std::chrono::hours(1));
  Result<ObjectInfo> again = store_->stat_info(kKey, IoContext{});
  ASSERT_TRUE(again) << again.status().to_string();
  EXPECT_NE(again->version, info->version);
}

TEST_F(HttpStoreTest, RangesAreByteExact) {
  for (const auto& [offset, length] : std::vector<std::pair<uint64_t, uint64_t>>{
           {0, kObjectSize}, {0, 1}, {4096, 4096}, {kMiB - 7, 2 * kMiB}, {kObjectSize - 1, 1}}) {
    auto [bytes, status] = read_range(*store_, offset, length);
    ASSERT_TRUE(status.is_ok()) << status.to_string();
    ASSERT_EQ(bytes.size(), length);
    EXPECT_EQ(first_pattern_mismatch(kSeed, offset, bytes), bytes.size()) << offset;
  }
  Result<uint64_t> size = store_->stat(kKey, IoContext{});
  ASSERT_TRUE(size) << size.status().to_string();
  EXPECT_EQ(*size, kObjectSize);
}

// Reads of every size, one after another on one response: a read that
// fills its buffer pauses the transfer, the rest of that receive waits in
// the spill buffer, and the next read takes it before the transfer goes on.
TEST_F(HttpStoreTest, ReadsOfAnySizeGetEveryByteInOrder) {
  auto reader = store_->open_range(kKey, 0, kObjectSize, IoContext{});
  ASSERT_TRUE(reader) << reader.status().to_string();
  const std::vector<size_t> sizes = {1, 7, 16384, 16385, 300000, 262144, 100, 1 << 20};
  std::vector<std::byte> out;
  std::vector<std::byte> buffer(1 << 20);
  for (size_t i = 0;; ++i) {
    Result<size_t> got = (*reader)->read(std::span(buffer).first(sizes[i % sizes.size()]));
    ASSERT_TRUE(got) << got.status().to_string();
    if (*got == 0) break;
    out.insert(out.end(), buffer.begin(), buffer.begin() + static_cast<long>(*got));
  }
  ASSERT_EQ(out.size(), kObjectSize);
  EXPECT_EQ(first_pattern_mismatch(kSeed, 0, out), out.size());
}

TEST_F(HttpStoreTest, ARangePastTheEndIsClippedOrRefused) {
  auto reader = store_->open_range(kKey, kObjectSize - 100, 4 * kMiB, IoContext{});
  ASSERT_TRUE(reader) << reader.status().to_string();
  EXPECT_EQ((*reader)->object_size(), kObjectSize);
  EXPECT_EQ((*reader)->range_length(), 100u);
  auto [bytes, status] = read_range(*store_, kObjectSize - 100, 4 * kMiB);
  EXPECT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(bytes.size(), 100u);
  // At the end exactly: empty. Past it: kOutOfRange.
  auto at_end = store_->open_range(kKey, kObjectSize, 10, IoContext{});
  ASSERT_TRUE(at_end) << at_end.status().to_string();
  EXPECT_EQ((*at_end)->range_length(), 0u);
  EXPECT_EQ(store_->open_range(kKey, kObjectSize + 1, 10, IoContext{}).status().code(),
            StatusCode::kOutOfRange);
}

TEST_F(HttpStoreTest, AMissingObjectIsNotFound) {
  Result<std::unique_ptr<RangeReader>> reader =
      store_->open_range("no/such/object", 0, 10, IoContext{});
  ASSERT_FALSE(reader);
  EXPECT_EQ(reader.status().code(), StatusCode::kNotFound);
  EXPECT_NE(reader.status().message().find("object not found: no/such/object"), std::string::npos);
  EXPECT_EQ(store_->stat("no/such/object", IoContext{}).status().code(), StatusCode::kNotFound);
}

TEST_F(HttpStoreTest, SequentialRangesShareOneConnection) {
  for (int i = 0; i < 5; ++i) {
    ASSERT_TRUE(read_range(*store_, static_cast<uint64_t>(i) * 4096, 4096).second.is_ok());
  }
  std::set<std::string> connections;
  std::istringstream log(server_->access_log());
  for (std::string line; std::getline(log, line);)
    connections.insert(line.substr(0, line.find(' ')));
  EXPECT_EQ(connections.size(), 1u) << server_->access_log();
}

TEST_F(HttpStoreTest, AWholeObjectAnswerToARangeRequestIsRefused) {
  auto full = open("/full");
  auto [bytes, status] = read_range(*full, 4096, 4096);
  EXPECT_EQ(status.code(), StatusCode::kCorruption) << status.to_string();
  EXPECT_NE(status.message().find("whole object"), std::string::npos) << status.to_string();
  EXPECT_NE(status.message().find(kKey), std::string::npos) << status.to_string();
  // Asking for the whole object, a 200 is the right answer.
  auto [whole, whole_status] = read_range(*full, 0, kObjectSize);
  EXPECT_TRUE(whole_status.is_ok()) << whole_status.to_string();
  EXPECT_EQ(whole.size(), kObjectSize);
}

TEST_F(HttpStoreTest, AWrongContentRangeIsRefused) {
  auto wrong = open("/wrong-range");
  auto [bytes, status] = read_range(*wrong, 4096, 4096);
  EXPECT_EQ(status.code(), StatusCode::kCorruption) << status.to_string();
  EXPECT_NE(status.message().find("not the range asked"), std::string::npos) << status.to_string();
  EXPECT_TRUE(bytes.empty());
}

TEST_F(HttpStoreTest, ATruncatedBodyIsATransientErrorAndRetriesDoNotHelpIt) {
  auto truncated = open("/truncated");
  auto [bytes, status] = read_range(*truncated, 0, kMiB);
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.to_string();
  EXPECT_LT(bytes.size(), kMiB);
  EXPECT_EQ(first_pattern_mismatch(kSeed, 0, bytes), bytes.size()) << "wrong bytes before the cut";
}

TEST_F(HttpStoreTest, ErrorStatusesMapToTheirKinds) {
  EXPECT_EQ(read_range(*open("/status/503"), 0, 10).second.code(), StatusCode::kUnavailable);
  EXPECT_EQ(read_range(*open("/status/500"), 0, 10).second.code(), StatusCode::kUnavailable);
  const Status denied = read_range(*open("/status/403"), 0, 10).second;
  EXPECT_EQ(denied.code(), StatusCode::kIoError);
  EXPECT_NE(denied.message().find("403"), std::string::npos) << denied.to_string();
}

TEST_F(HttpStoreTest, AStalledResponseFailsAfterTheStallTimeout) {
  HttpClientOptions options;
  options.stall_timeout = std::chrono::milliseconds(300);
  auto stall = open("/stall", options);
  auto [bytes, status] = read_range(*stall, 0, kMiB);
  EXPECT_EQ(status.code(), StatusCode::kUnavailable) << status.to_string();
  EXPECT_NE(status.message().find("stalled"), std::string::npos) << status.to_string();
  EXPECT_EQ(bytes.size(), 65536u);
}

TEST_F(HttpStoreTest, ASlowFirstByteEndsAtTheDeadline) {
  auto slow = open("/slow");
  const IoContext io{Clock::now() + std::chrono::milliseconds(200), {}};
  auto [bytes, status] = read_range(*slow, 0, 10, io);
  EXPECT_EQ(status.code(), StatusCode::kTimeout) << status.to_string();
}

TEST_F(HttpStoreTest, AStopWakesABlockedRead) {
  auto slow = open("/slow");
  std::stop_source stop;
  Status status;
  std::thread reader([&] {
    status = read_range(*slow, 0, 10, IoContext{Clock::time_point::max(), stop.get_token()}).second;
  });
  // Once nginx holds the request, the reader is blocked waiting for its
  // first byte: the stop must end that wait.
  while (!server_->slow_request_arrived()) std::this_thread::yield();
  stop.request_stop();
  reader.join();
  EXPECT_EQ(status.code(), StatusCode::kCancelled) << status.to_string();
}

TEST_F(HttpStoreTest, TheShapedLocationServesRightBytesAtItsPace) {
  auto shaped = open("/shaped");
  auto [bytes, status] = read_range(*shaped, 100, 2 * kMiB);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(first_pattern_mismatch(kSeed, 100, bytes), bytes.size());
}

TEST_F(HttpStoreTest, IsReadOnly) {
  EXPECT_EQ(store_->put("x", {}, IoContext{}).code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(store_->remove("x", IoContext{}).code(), StatusCode::kInvalidArgument);
}

TEST_F(HttpStoreTest, RefusedConnectionsAreTransient) {
  auto nowhere = HttpStore::open("http://127.0.0.1:1");
  ASSERT_TRUE(nowhere);
  EXPECT_EQ(read_range(**nowhere, 0, 10).second.code(), StatusCode::kUnavailable);
}

}  // namespace
}  // namespace lazyblock
