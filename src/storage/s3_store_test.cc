// The s3 store against a real S3-API server on 127.0.0.1 (s3rver behind a
// front that checks SigV4 signatures as S3 does: testing/s3_server.h).
#include "storage/s3_store.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <random>
#include <thread>

#include <fmt/format.h>

#include "common/units.h"
#include "testing/pattern.h"
#include "testing/s3_server.h"

namespace lazyblock {
namespace {

using testing::first_pattern_mismatch;
using testing::make_pattern;

constexpr uint64_t kSeed = 29;
const std::string kBucket = "snapshots";

size_t count(std::string_view text, std::string_view part) {
  size_t n = 0;
  for (size_t at = text.find(part); at != std::string_view::npos; at = text.find(part, at + 1)) ++n;
  return n;
}

// Whether the server answered a request whose line has every one of `parts`.
bool answered(const testing::S3Server& server, const std::vector<std::string>& parts) {
  for (const std::string& line : server.requests()) {
    if (std::all_of(parts.begin(), parts.end(), [&](const std::string& part) {
          return line.find(part) != std::string::npos;
        })) {
      return true;
    }
  }
  return false;
}

class S3StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<std::unique_ptr<testing::S3Server>> server = testing::S3Server::start({kBucket});
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
    store_ = open(testing::S3Server::kSecretAccessKey);
  }

  // Replaces the fixture's server with one started with `options`, and its
  // store with one signing for `region`.
  void restart(const testing::S3Server::Options& options, const std::string& region = "us-east-1") {
    server_.reset();
    Result<std::unique_ptr<testing::S3Server>> server =
        testing::S3Server::start({kBucket}, options);
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
    store_ = open(testing::S3Server::kSecretAccessKey, region);
  }

  S3Config config(const std::string& secret, const std::string& region = "us-east-1") const {
    S3Config config;
    config.region = region;
    config.bucket = kBucket;
    config.prefix = "templates";
    config.endpoint = server_->endpoint();
    config.credentials = SigV4Credentials{testing::S3Server::kAccessKeyId, secret, ""};
    config.part_size = 5 * kMiB;
    config.multipart_threshold = 5 * kMiB;
    return config;
  }

  std::shared_ptr<S3Store> open(const std::string& secret,
                                const std::string& region = "us-east-1") {
    Result<std::shared_ptr<S3Store>> store = S3Store::open(config(secret, region));
    EXPECT_TRUE(store) << store.status().to_string();
    return store ? *store : nullptr;
  }

  static std::pair<std::vector<std::byte>, Status> read_range(ObjectStore& store,
                                                              const std::string& key,
                                                              uint64_t offset, uint64_t length) {
    std::vector<std::byte> out;
    auto reader = store.open_range(key, offset, length, IoContext{});
    if (!reader) return {out, reader.status()};
    std::vector<std::byte> buffer(65536);
    for (;;) {
      Result<size_t> got = (*reader)->read(buffer);
      if (!got) return {out, got.status()};
      if (*got == 0) break;
      out.insert(out.end(), buffer.begin(), buffer.begin() + static_cast<long>(*got));
    }
    if (out.size() != (*reader)->range_length()) return {out, Status::corruption("short")};
    return {out, Status::ok()};
  }

  std::unique_ptr<testing::S3Server> server_;
  std::shared_ptr<S3Store> store_;
};

TEST_F(S3StoreTest, PutThenReadRanges) {
  constexpr uint64_t kSize = 3 * kMiB + 5;  // one PUT
  ASSERT_TRUE(store_->put("b1/memfile", make_pattern(kSeed, 0, kSize), IoContext{}).is_ok());
  Result<uint64_t> size = store_->stat("b1/memfile", IoContext{});
  ASSERT_TRUE(size) << size.status().to_string();
  EXPECT_EQ(*size, kSize);
  for (const auto& [offset, length] : std::vector<std::pair<uint64_t, uint64_t>>{
           {0, kSize}, {4096, 4096}, {kSize - 10, 100}, {kMiB + 1, 2 * kMiB}}) {
    auto [bytes, status] = read_range(*store_, "b1/memfile", offset, length);
    ASSERT_TRUE(status.is_ok()) << status.to_string();
    ASSERT_EQ(bytes.size(), std::min(length, kSize - offset));
    EXPECT_EQ(first_pattern_mismatch(kSeed, offset, bytes), bytes.size());
  }
  EXPECT_EQ(store_->open_range("b1/memfile", kSize + 1, 10, IoContext{}).status().code(),
            StatusCode::kOutOfRange);
}

TEST_F(S3StoreTest, LargeObjectsGoUpInParts) {
  constexpr uint64_t kSize = 12 * kMiB + 7;  // three parts of 5 MiB, 5 MiB, 2 MiB + 7
  ASSERT_TRUE(store_->put("big", make_pattern(kSeed, 0, kSize), IoContext{}).is_ok());
  auto [bytes, status] = read_range(*store_, "big", 0, kSize);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  ASSERT_EQ(bytes.size(), kSize);
  EXPECT_EQ(first_pattern_mismatch(kSeed, 0, bytes), bytes.size());
}

TEST_F(S3StoreTest, MissingObjectsAreNotFound) {
  Result<std::unique_ptr<RangeReader>> reader = store_->open_range("nope", 0, 10, IoContext{});
  ASSERT_FALSE(reader);
  EXPECT_EQ(reader.status().code(), StatusCode::kNotFound);
  EXPECT_NE(reader.status().message().find("object not found: nope"), std::string::npos)
      << reader.status().to_string();
  EXPECT_EQ(store_->stat("nope", IoContext{}).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->remove("nope", IoContext{}).code(), StatusCode::kNotFound);
}

TEST_F(S3StoreTest, RemoveDeletes) {
  ASSERT_TRUE(store_->put("gone", make_pattern(kSeed, 0, 10), IoContext{}).is_ok());
  ASSERT_TRUE(store_->remove("gone", IoContext{}).is_ok());
  EXPECT_EQ(store_->stat("gone", IoContext{}).status().code(), StatusCode::kNotFound);
}

TEST_F(S3StoreTest, AWrongSecretIsRefused) {
  ASSERT_TRUE(store_->put("secret", make_pattern(kSeed, 0, 10), IoContext{}).is_ok());
  std::shared_ptr<S3Store> wrong = open("not-the-secret");
  ASSERT_TRUE(wrong);
  auto [bytes, status] = read_range(*wrong, "secret", 0, 10);
  EXPECT_EQ(status.code(), StatusCode::kIoError) << status.to_string();
  EXPECT_NE(status.message().find("SignatureDoesNotMatch"), std::string::npos)
      << status.to_string();
  EXPECT_TRUE(bytes.empty());
  EXPECT_EQ(wrong->put("secret", make_pattern(kSeed + 1, 0, 10), IoContext{}).code(),
            StatusCode::kIoError);
  // Nothing was overwritten.
  auto [kept, kept_status] = read_range(*store_, "secret", 0, 10);
  ASSERT_TRUE(kept_status.is_ok()) << kept_status.to_string();
  EXPECT_EQ(first_pattern_mismatch(kSeed, 0, kept), kept.size());
}

TEST_F(S3StoreTest, AnUnknownAccessKeyIsRefused) {
  ASSERT_TRUE(store_->put("secret", make_pattern(kSeed, 0, 10), IoContext{}).is_ok());
  S3Config stranger = config(testing::S3Server::kSecretAccessKey);
  stranger.credentials->access_key_id = "STRANGER";
  Result<std::shared_ptr<S3Store>> store = S3Store::open(stranger);
  ASSERT_TRUE(store);
  auto [bytes, status] = read_range(**store, "secret", 0, 10);
  EXPECT_EQ(status.code(), StatusCode::kIoError) << status.to_string();
  EXPECT_NE(status.message().find("InvalidAccessKeyId"), std::string::npos) << status.to_string();
  EXPECT_NE(status.message().find("the server knows no access key STRANGER: check "
                                  "AWS_ACCESS_KEY_ID"),
            std::string::npos)
      << status.to_string();
  EXPECT_TRUE(bytes.empty());
}

// curl sends `Host: HOST` for http://HOST:80 (it drops a scheme's default
// port); the signature must cover the Host header as sent. Port 80 of a
// loopback address of the test's own (127.X.Y.Z), so that nothing else
// listening on port 80 is disturbed; skipped where port 80 cannot be had.
TEST_F(S3StoreTest, AnEndpointWithItsDefaultPortIsSignedAsSent) {
  std::mt19937 rng(std::random_device{}());
  testing::S3Server::Options on_port_80;
  on_port_80.address =
      fmt::format("127.{}.{}.{}", 1 + rng() % 254, 1 + rng() % 254, 1 + rng() % 254);
  on_port_80.port = 80;
  Result<std::unique_ptr<testing::S3Server>> server =
      testing::S3Server::start({kBucket}, on_port_80);
  if (!server && server.status().code() == StatusCode::kUnavailable) {
    GTEST_SKIP() << "port 80 cannot be bound here: " << server.status().to_string();
  }
  ASSERT_TRUE(server) << server.status().to_string();
  S3Config at_80 = config(testing::S3Server::kSecretAccessKey);
  at_80.endpoint = (*server)->endpoint();
  ASSERT_EQ(at_80.endpoint, "http://" + on_port_80.address + ":80");
  Result<std::shared_ptr<S3Store>> store = S3Store::open(at_80);
  ASSERT_TRUE(store) << store.status().to_string();
  const Status put = (*store)->put("b1/memfile", make_pattern(kSeed, 0, 10000), IoContext{});
  ASSERT_TRUE(put.is_ok()) << put.to_string();
  auto [bytes, status] = read_range(**store, "b1/memfile", 100, 5000);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(first_pattern_mismatch(kSeed, 100, bytes), bytes.size());
}

// curl removes "." and ".." segments from a path before sending it, so such
// a key would be signed as one path and sent as another, or address another
// object than asked: refused before anything is sent.
TEST_F(S3StoreTest, KeysWithDotSegmentsAreRefused) {
  for (const std::string key : {"a/../b", "../b", "a/./b", ".", "a/.."}) {
    const Status put = store_->put(key, make_pattern(kSeed, 0, 10), IoContext{});
    EXPECT_EQ(put.code(), StatusCode::kInvalidArgument) << key << ": " << put.to_string();
    EXPECT_NE(put.message().find("'" + key + "'"), std::string::npos) << put.to_string();
    EXPECT_NE(put.message().find("segment"), std::string::npos) << put.to_string();
    EXPECT_EQ(store_->stat(key, IoContext{}).status().code(), StatusCode::kInvalidArgument);
    EXPECT_EQ(store_->open_range(key, 0, 10, IoContext{}).status().code(),
              StatusCode::kInvalidArgument);
    EXPECT_EQ(store_->remove(key, IoContext{}).code(), StatusCode::kInvalidArgument);
  }
  EXPECT_TRUE(server_->requests().empty());
  // Dots inside a segment are plain characters.
  const Status dotted = store_->put("a/..b/c.d/...", make_pattern(kSeed, 0, 10), IoContext{});
  EXPECT_TRUE(dotted.is_ok()) << dotted.to_string();
  // So is a prefix.
  S3Config dotted_prefix = config(testing::S3Server::kSecretAccessKey);
  dotted_prefix.prefix = "templates/../other";
  Result<std::shared_ptr<S3Store>> refused = S3Store::open(dotted_prefix);
  ASSERT_FALSE(refused);
  EXPECT_EQ(refused.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(refused.status().message().find("templates/../other"), std::string::npos)
      << refused.status().to_string();
}

// S3 keeps the Content-Type of the request that starts a multipart upload as
// the object's: it must be what a single PUT leaves (S3's default), not the
// form type curl puts on a POST.
TEST_F(S3StoreTest, MultipartObjectsGetTheSameContentTypeAsSinglePuts) {
  testing::S3Server::Options public_bucket;
  public_bucket.anonymous_reads = true;
  ASSERT_NO_FATAL_FAILURE(restart(public_bucket));
  ASSERT_TRUE(store_->put("small", make_pattern(kSeed, 0, 1000), IoContext{}).is_ok());
  ASSERT_TRUE(store_->put("large", make_pattern(kSeed, 0, 11 * kMiB), IoContext{}).is_ok());
  const auto content_type = [&](const std::string& key) -> std::string {
    HttpClient client;
    HttpRequest head;
    head.method = "HEAD";
    head.url = fmt::format("{}/{}/templates/{}", server_->endpoint(), kBucket, key);
    Result<std::unique_ptr<HttpResponse>> response = client.send(head, IoContext{});
    if (!response) return response.status().to_string();
    if ((*response)->status() != 200) return fmt::format("HTTP {}", (*response)->status());
    return (*response)->header("Content-Type").value_or("(none)");
  };
  const std::string single = content_type("small");
  EXPECT_EQ(single, "binary/octet-stream");
  EXPECT_EQ(content_type("large"), single);
}

TEST_F(S3StoreTest, ErrorsNameTheStoreAndTheKeyOnce) {
  ASSERT_TRUE(store_->put("b1/memfile", make_pattern(kSeed, 0, 10), IoContext{}).is_ok());
  std::shared_ptr<S3Store> wrong = open("not-the-secret");
  ASSERT_TRUE(wrong);
  const std::string store = "s3://snapshots/templates (" + server_->endpoint() + ")";
  auto [bytes, read] = read_range(*wrong, "b1/memfile", 0, 10);
  const Status stat = wrong->stat("b1/memfile", IoContext{}).status();
  const Status put = wrong->put("b1/memfile", make_pattern(kSeed, 0, 10), IoContext{});
  const Status multipart = wrong->put("b1/memfile", make_pattern(kSeed, 0, 6 * kMiB), IoContext{});
  for (const Status& status : {read, stat, put, multipart}) {
    EXPECT_EQ(status.code(), StatusCode::kIoError) << status.to_string();
    EXPECT_EQ(status.message().rfind(store + ": ", 0), 0u) << status.to_string();
    EXPECT_EQ(count(status.message(), "b1/memfile"), 1u) << status.to_string();
    // S3's own words are kept, and what to do is said.
    EXPECT_NE(status.message().find("SignatureDoesNotMatch, HTTP 403: The request signature we "
                                    "calculated does not match"),
              std::string::npos)
        << status.to_string();
    EXPECT_NE(status.message().find("check AWS_SECRET_ACCESS_KEY"), std::string::npos)
        << status.to_string();
  }
  // (A HEAD's answer has no body: stat asked again with a GET to learn why.)
  EXPECT_TRUE(
      answered(*server_, {"GET /snapshots/templates/b1/memfile 403 SignatureDoesNotMatch"}));
  // A transport failure names them too.
  server_.reset();
  const Status gone = store_->stat("b1/memfile", IoContext{}).status();
  EXPECT_EQ(gone.code(), StatusCode::kUnavailable) << gone.to_string();
  EXPECT_EQ(gone.message().rfind(store + ": stat b1/memfile: ", 0), 0u) << gone.to_string();
  EXPECT_EQ(count(gone.message(), "b1/memfile"), 1u) << gone.to_string();
}

TEST_F(S3StoreTest, AMissingBucketIsNamedOnReadsAndWrites) {
  S3Config elsewhere = config(testing::S3Server::kSecretAccessKey);
  elsewhere.bucket = "no-such-bucket";
  Result<std::shared_ptr<S3Store>> store = S3Store::open(elsewhere);
  ASSERT_TRUE(store);
  auto [bytes, read] = read_range(**store, "b1/memfile", 0, 10);
  const Status stat = (*store)->stat("b1/memfile", IoContext{}).status();
  const Status put = (*store)->put("b1/memfile", make_pattern(kSeed, 0, 10), IoContext{});
  const Status multipart =
      (*store)->put("b1/memfile", make_pattern(kSeed, 0, 6 * kMiB), IoContext{});
  const Status remove = (*store)->remove("b1/memfile", IoContext{});
  for (const Status& status : {read, stat, put, multipart, remove}) {
    EXPECT_EQ(status.code(), StatusCode::kNotFound) << status.to_string();
    EXPECT_NE(status.message().find("bucket no-such-bucket does not exist (NoSuchBucket, HTTP "
                                    "404: The specified bucket does not exist)"),
              std::string::npos)
        << status.to_string();
  }
}

TEST_F(S3StoreTest, ABucketInAnotherRegionIsNamed) {
  testing::S3Server::Options ireland;
  ireland.region = "eu-west-1";
  ASSERT_NO_FATAL_FAILURE(restart(ireland, "us-east-1"));
  auto [bytes, read] = read_range(*store_, "b1/memfile", 0, 10);
  const Status stat = store_->stat("b1/memfile", IoContext{}).status();
  const Status put = store_->put("b1/memfile", make_pattern(kSeed, 0, 10), IoContext{});
  for (const Status& status : {read, stat, put}) {
    EXPECT_EQ(status.code(), StatusCode::kIoError) << status.to_string();
    EXPECT_NE(status.message().find("bucket snapshots is in region eu-west-1, not us-east-1: set "
                                    "AWS_REGION=eu-west-1 (AuthorizationHeaderMalformed, HTTP "
                                    "400: The authorization header is malformed; the region "
                                    "'us-east-1' is wrong; expecting 'eu-west-1')"),
              std::string::npos)
        << status.to_string();
  }
  // Signed for the right region, the same requests pass.
  std::shared_ptr<S3Store> right = open(testing::S3Server::kSecretAccessKey, "eu-west-1");
  ASSERT_TRUE(right->put("b1/memfile", make_pattern(kSeed, 0, 10), IoContext{}).is_ok());
  EXPECT_TRUE(right->stat("b1/memfile", IoContext{}));
}

TEST_F(S3StoreTest, WithoutCredentialsReadsOfAPublicBucketPass) {
  testing::S3Server::Options public_bucket;
  public_bucket.anonymous_reads = true;
  ASSERT_NO_FATAL_FAILURE(restart(public_bucket));
  ASSERT_TRUE(store_->put("b1/memfile", make_pattern(kSeed, 0, 5000), IoContext{}).is_ok());
  S3Config anonymous = config("");
  anonymous.credentials.reset();
  Result<std::shared_ptr<S3Store>> store = S3Store::open(anonymous);
  ASSERT_TRUE(store);
  auto [bytes, read] = read_range(**store, "b1/memfile", 10, 4000);
  ASSERT_TRUE(read.is_ok()) << read.to_string();
  EXPECT_EQ(first_pattern_mismatch(kSeed, 10, bytes), bytes.size());
  const Status put = (*store)->put("b1/other", make_pattern(kSeed, 0, 10), IoContext{});
  EXPECT_EQ(put.code(), StatusCode::kIoError) << put.to_string();
  EXPECT_NE(put.message().find("the request went without credentials: set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (AccessDenied, HTTP 403: Access Denied)"),
            std::string::npos)
      << put.to_string();
}

// A part that fails ends the upload: it is aborted, so that the server holds
// no parts of it.
TEST_F(S3StoreTest, AFailedPartAbortsTheUpload) {
  testing::S3Server::Options faulty;
  faulty.fail_part = 2;
  ASSERT_NO_FATAL_FAILURE(restart(faulty));
  const Status put = store_->put("big", make_pattern(kSeed, 0, 12 * kMiB), IoContext{});
  EXPECT_EQ(put.code(), StatusCode::kUnavailable) << put.to_string();  // a 500: worth a retry
  EXPECT_NE(put.message().find("put big (multipart upload, part 2 of 3): InternalError, HTTP "
                               "500"),
            std::string::npos)
      << put.to_string();
  EXPECT_TRUE(server_->uploads(kBucket).empty());
  EXPECT_TRUE(answered(*server_, {"DELETE /snapshots/templates/big?uploadId=", " 204"}))
      << ::testing::PrintToString(server_->requests());
  EXPECT_FALSE(answered(*server_, {"partNumber=3"}));
  EXPECT_EQ(store_->stat("big", IoContext{}).status().code(), StatusCode::kNotFound);
}

// A stop requested from another thread while a part is on its way ends the
// upload at once, aborted. (The server holds part 3 unanswered, so the
// upload cannot finish before the stop.)
TEST_F(S3StoreTest, AStopDuringAPartAbortsTheUpload) {
  testing::S3Server::Options stalling;
  stalling.stall_part = 3;
  ASSERT_NO_FATAL_FAILURE(restart(stalling));
  std::stop_source stop;
  IoContext io;
  io.stop = stop.get_token();
  Status put;
  std::atomic<bool> returned{false};
  std::thread uploader([&] {
    put = store_->put("big", make_pattern(kSeed, 0, 17 * kMiB), io);
    returned = true;
  });
  // Polling a real condition: part 3 has reached the server (or the put
  // failed before, which the checks below report).
  while (!returned && !answered(*server_, {"partNumber=3", " held"})) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  const std::vector<testing::S3Server::Upload> uploads = server_->uploads(kBucket);
  stop.request_stop();
  uploader.join();
  ASSERT_EQ(uploads.size(), 1u) << put.to_string();
  EXPECT_EQ(uploads[0].key, "templates/big");
  EXPECT_EQ(uploads[0].parts, 2);
  EXPECT_EQ(put.code(), StatusCode::kCancelled) << put.to_string();
  EXPECT_NE(put.message().find("part 3 of 4"), std::string::npos) << put.to_string();
  EXPECT_TRUE(server_->uploads(kBucket).empty());
  EXPECT_TRUE(answered(*server_, {"DELETE /snapshots/templates/big?uploadId=", " 204"}));
  EXPECT_FALSE(answered(*server_, {"partNumber=4"}));
}

// So does the deadline; and a put stopped before it starts sends nothing.
TEST_F(S3StoreTest, TheDeadlineAndAnEarlyStopEndTheUploadToo) {
  testing::S3Server::Options stalling;
  stalling.stall_part = 1;
  ASSERT_NO_FATAL_FAILURE(restart(stalling));
  IoContext soon;  // long enough to start the upload, which part 1 then outlasts
  soon.deadline = Clock::now() + std::chrono::seconds(3);
  const Status late = store_->put("big", make_pattern(kSeed, 0, 12 * kMiB), soon);
  EXPECT_EQ(late.code(), StatusCode::kTimeout) << late.to_string();
  EXPECT_TRUE(server_->uploads(kBucket).empty());
  EXPECT_TRUE(answered(*server_, {"DELETE /snapshots/templates/big?uploadId=", " 204"}));

  const size_t before = server_->requests().size();
  std::stop_source stop;
  stop.request_stop();
  IoContext stopped;
  stopped.stop = stop.get_token();
  EXPECT_EQ(store_->put("big", make_pattern(kSeed, 0, 12 * kMiB), stopped).code(),
            StatusCode::kCancelled);
  EXPECT_EQ(server_->requests().size(), before);
}

TEST_F(S3StoreTest, ConfigurationComesFromTheEnvironment) {
  testing::S3Server::Options paris;
  paris.region = "eu-west-3";
  ASSERT_NO_FATAL_FAILURE(restart(paris, "eu-west-3"));
  ::setenv("AWS_ENDPOINT_URL", server_->endpoint().c_str(), 1);
  ::setenv("AWS_ACCESS_KEY_ID", testing::S3Server::kAccessKeyId, 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", testing::S3Server::kSecretAccessKey, 1);
  ::setenv("AWS_REGION", "eu-west-3", 1);
  Result<S3Config> config = S3Config::from_url("s3://" + kBucket + "/templates/");
  ::unsetenv("AWS_ENDPOINT_URL");
  ::unsetenv("AWS_ACCESS_KEY_ID");
  ::unsetenv("AWS_SECRET_ACCESS_KEY");
  ::unsetenv("AWS_REGION");
  ASSERT_TRUE(config) << config.status().to_string();
  EXPECT_EQ(config->bucket, kBucket);
  EXPECT_EQ(config->prefix, "templates");
  EXPECT_EQ(config->region, "eu-west-3");
  EXPECT_TRUE(config->path_style);  // a custom endpoint
  // The store it makes reads what this test's store wrote.
  ASSERT_TRUE(store_->put("env", make_pattern(kSeed, 0, 5000), IoContext{}).is_ok());
  Result<std::shared_ptr<S3Store>> from_env = S3Store::open(*config);
  ASSERT_TRUE(from_env);
  auto [bytes, status] = read_range(**from_env, "env", 0, 5000);
  EXPECT_TRUE(status.is_ok()) << status.to_string();
  // Without an endpoint: AWS itself, virtual-hosted.
  Result<S3Config> aws = S3Config::from_url("s3://bucket");
  ASSERT_TRUE(aws);
  EXPECT_EQ(aws->endpoint, "https://s3.us-east-1.amazonaws.com");
  EXPECT_FALSE(aws->path_style);
  EXPECT_FALSE(aws->credentials);
}

TEST_F(S3StoreTest, GcsUrlsSpeakTheSameProtocol) {
  // GCS's interoperability API takes "auto" for a region.
  testing::S3Server::Options gcs_like;
  gcs_like.region = "auto";
  ASSERT_NO_FATAL_FAILURE(restart(gcs_like, "auto"));
  ::setenv("GCS_ENDPOINT_URL", server_->endpoint().c_str(), 1);
  ::setenv("AWS_ACCESS_KEY_ID", testing::S3Server::kAccessKeyId, 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", testing::S3Server::kSecretAccessKey, 1);
  Result<S3Config> config = S3Config::from_url("gs://" + kBucket + "/templates");
  ::unsetenv("GCS_ENDPOINT_URL");
  ::unsetenv("AWS_ACCESS_KEY_ID");
  ::unsetenv("AWS_SECRET_ACCESS_KEY");
  ASSERT_TRUE(config) << config.status().to_string();
  EXPECT_EQ(config->scheme, "gs");
  ASSERT_TRUE(store_->put("gcs", make_pattern(kSeed, 0, 7000), IoContext{}).is_ok());
  Result<std::shared_ptr<S3Store>> gcs = S3Store::open(*config);
  ASSERT_TRUE(gcs);
  auto [bytes, status] = read_range(**gcs, "gcs", 100, 5000);
  EXPECT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_EQ(first_pattern_mismatch(kSeed, 100, bytes), bytes.size());
}

}  // namespace
}  // namespace lazyblock
