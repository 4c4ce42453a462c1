// The s3 store against a real S3-API server on 127.0.0.1 (s3rver behind a
// front that checks SigV4 signatures as S3 does: testing/s3_server.h).
#include "storage/s3_store.h"

#include <gtest/gtest.h>

#include <cstdlib>


#include "common/units.h"
#include "testing/pattern.h"
#include "testing/s3_server.h"

namespace lazyblock {
namespace {

using testing::first_pattern_mismatch;
using testing::make_pattern;

constexpr uint64_t kSeed = 29;
const std::string kBucket = "snapshots";

class S3StoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<std::unique_ptr<testing::S3Server>> server = testing::S3Server::start({kBucket});
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
    store_ = open(testing::S3Server::kSecretAccessKey);
  }

  S3Config config(const std::string& secret, const std::string& region = "us-east-1") const {
    S3Config config;
    config.region = region;
    config.bucket = kBucket;
    config.prefix = "templates";
    config.endpoint = server_->endpoint();
    config.credentials =
        SigV4Credentials{testing::S3Server::kAccessKeyId, secret, ""};
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
  EXPECT_NE(status.message().find("access denied"), std::string::npos) << status.to_string();
  EXPECT_TRUE(bytes.empty());
}

TEST_F(S3StoreTest, ConfigurationComesFromTheEnvironment) {
  testing::S3Server::Options paris;
  paris.region = "eu-west-3";
  Result<std::unique_ptr<testing::S3Server>> server = testing::S3Server::start({kBucket}, paris);
  ASSERT_TRUE(server) << server.status().to_string();
  server_ = std::move(server).value();
  store_ = open(testing::S3Server::kSecretAccessKey, "eu-west-3");
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
  Result<std::unique_ptr<testing::S3Server>> server = testing::S3Server::start({kBucket}, gcs_like);
  ASSERT_TRUE(server) << server.status().to_string();
  server_ = std::move(server).value();
  store_ = open(testing::S3Server::kSecretAccessKey, "auto");
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
