// lazyblock against a real S3-API server on 127.0.0.1 (s3rver behind a front
// that checks signatures as S3 does): packing into a bucket (multipart for
// large data files), exporting and cat-ing back byte-exact, a second process
// served by --cache-dir once the server is gone, and the errors a user meets
// when the configuration is wrong, each saying where and what to do.
#include <signal.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <thread>

#include "common/units.h"
#include "testing/s3_server.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

int count_of(const std::string& text, const std::string& part) {
  int count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++count;
  return count;
}

const std::string kBuild = "5e5e5e5e-1111-4222-8333-444455556666";

class S3CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_NO_FATAL_FAILURE(restart({}));
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    ::setenv("AWS_ACCESS_KEY_ID", testing::S3Server::kAccessKeyId, 1);
    ::setenv("AWS_SECRET_ACCESS_KEY", testing::S3Server::kSecretAccessKey, 1);
  }
  void TearDown() override {
    for (const char* name : {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                             "AWS_REGION", "AWS_SESSION_TOKEN"}) {
      ::unsetenv(name);
    }
  }

  // A server started with `options` in place of the fixture's; the child
  // processes read their configuration from the environment.
  void restart(const testing::S3Server::Options& options) {
    server_.reset();
    Result<std::unique_ptr<testing::S3Server>> server =
        testing::S3Server::start({"snapshots"}, options);
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
    ::setenv("AWS_ENDPOINT_URL", server_->endpoint().c_str(), 1);
  }

  // Packs a small image of build kBuild; returns the outcome.
  Outcome pack() {
    std::ofstream(dir_ / "small", std::ios::binary) << std::string(3 * 4096, 'x');
    return run_lazyblock(dir_, {"pack", "--store", store_, "--build", kBuild, "--name",
                                "rootfs.ext4", (dir_ / "small").string()});
  }
  Outcome cat(const std::vector<std::string>& more = {}) {
    std::vector<std::string> args = {
        "cat", "--store", store_, "--key", kBuild + "/rootfs.ext4", "-o", (dir_ / "out").string()};
    args.insert(args.end(), more.begin(), more.end());
    return run_lazyblock(dir_, args);
  }

  std::unique_ptr<testing::S3Server> server_;
  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  const std::string store_ = "s3://snapshots/templates";
};

TEST_F(S3CliTest, PackExportAndCatThroughABucket) {
  // 40 MiB of random data with zero holes: a data file large enough to go
  // up in parts.
  std::mt19937_64 rng(5);
  std::string raw(40 * kMiB + 123, '\0');
  for (size_t i = 0; i < raw.size(); ++i) {
    if ((i / 4096) % 7 != 3) raw[i] = static_cast<char>(rng());
  }
  std::ofstream(dir_ / "raw", std::ios::binary) << raw;
  Outcome packed = run_lazyblock(dir_, {"pack", "--store", store_, "--build", kBuild, "--name",
                                        "rootfs.ext4", (dir_ / "raw").string()});
  ASSERT_EQ(packed.status, 0) << packed.err;

  Outcome exported = run_lazyblock(dir_, {"export", "--store", store_, "--build", kBuild, "--name",
                                          "rootfs.ext4", "-o", (dir_ / "out").string()});
  ASSERT_EQ(exported.status, 0) << exported.err;
  EXPECT_TRUE(slurp(dir_ / "out") == raw);

  // The data file, raw, with a persistent cache; then a second process
  // reads it from the cache, asking the server only its size and version
  // (every stream it opened would fail at its first byte).
  const std::string cache_dir = (dir_ / "chunks").string();
  Outcome first = run_lazyblock(dir_, {"cat", "--store", store_, "--key", kBuild + "/rootfs.ext4",
                                       "--cache-dir", cache_dir, "-o", (dir_ / "data1").string()});
  ASSERT_EQ(first.status, 0) << first.err;
  Outcome second = run_lazyblock(
      dir_, {"cat", "--store", store_, "--key", kBuild + "/rootfs.ext4", "--cache-dir", cache_dir,
             "--faults", "fail-after=0", "--retry", "0", "-o", (dir_ / "data2").string()});
  ASSERT_EQ(second.status, 0) << second.err;
  EXPECT_TRUE(slurp(dir_ / "data2") == slurp(dir_ / "data1"));
  EXPECT_GT(std::filesystem::file_size(dir_ / "data2"), 30 * kMiB);
}

TEST_F(S3CliTest, APackInterruptedBySigintLeavesNoUploadBehind) {
  testing::S3Server::Options holding;
  holding.stall_part = 2;  // the second part is taken and never answered
  ASSERT_NO_FATAL_FAILURE(restart(holding));
  std::mt19937_64 rng(11);
  std::string raw(40 * kMiB, '\0');
  for (char& c : raw) c = static_cast<char>(rng() | 1);
  std::ofstream(dir_ / "raw", std::ios::binary) << raw;
  testing::SpawnOptions logged;
  logged.stdout_to = dir_ / "pack.log";
  logged.stderr_to = logged.stdout_to;
  Result<testing::ChildProcess> pack =
      start_lazyblock({"pack", "--store", store_, "--build", kBuild, "--name", "rootfs.ext4",
                       (dir_ / "raw").string()},
                      logged);
  ASSERT_TRUE(pack) << pack.status().to_string();
  // Until the held part has reached the server (a real condition, polled).
  const auto held = [&] {
    for (const std::string& line : server_->requests()) {
      if (line.find("held") != std::string::npos) return true;
    }
    return false;
  };
  while (!held() && pack->running()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(held()) << slurp(dir_ / "pack.log");
  ASSERT_EQ(server_->uploads("snapshots").size(), 1u) << "the upload is under way";
  pack->signal(SIGINT);
  const int status = pack->wait();
  ASSERT_NE(status, 128 + SIGINT) << "pack died of the signal instead of stopping";
  EXPECT_EQ(status, 1) << slurp(dir_ / "pack.log");
  EXPECT_NE(slurp(dir_ / "pack.log").find("interrupted"), std::string::npos)
      << slurp(dir_ / "pack.log");
  EXPECT_TRUE(server_->uploads("snapshots").empty()) << "the multipart upload was left behind";
}

TEST_F(S3CliTest, MissingObjectsAndBucketsAreExplained) {
  Outcome missing = run_lazyblock(dir_, {"cat", "--store", store_, "--key", "no/such"});
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("object not found: no/such"), std::string::npos) << missing.err;
  // One line, naming the store (bucket and prefix) and the key once each.
  EXPECT_EQ(count_of(missing.err, "\n"), 1) << missing.err;
  EXPECT_EQ(count_of(missing.err, store_), 1) << missing.err;
  EXPECT_EQ(count_of(missing.err, "no/such"), 1) << missing.err;
  Outcome no_bucket =
      run_lazyblock(dir_, {"cat", "--store", "s3://no-such-bucket", "--key", "x", "--retry", "0"});
  EXPECT_EQ(no_bucket.status, 1);
  EXPECT_NE(no_bucket.err.find("bucket no-such-bucket does not exist"), std::string::npos)
      << no_bucket.err;
  EXPECT_NE(no_bucket.err.find("NoSuchBucket"), std::string::npos) << no_bucket.err;
  EXPECT_EQ(count_of(no_bucket.err, "\n"), 1) << no_bucket.err;
  // Writes say the same.
  std::ofstream(dir_ / "small", std::ios::binary) << std::string(4096, 'x');
  Outcome no_bucket_write =
      run_lazyblock(dir_, {"pack", "--store", "s3://no-such-bucket/templates", "--build", kBuild,
                           "--name", "rootfs.ext4", (dir_ / "small").string()});
  EXPECT_EQ(no_bucket_write.status, 1);
  EXPECT_NE(no_bucket_write.err.find("bucket no-such-bucket does not exist"), std::string::npos)
      << no_bucket_write.err;
}

TEST_F(S3CliTest, AWrongSecretKeyIsExplainedAndNotRetried) {
  ASSERT_EQ(pack().status, 0);
  ::setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret", 1);
  const size_t before = server_->requests().size();
  Outcome once = cat({"--retry", "0"});
  const size_t without_retries = server_->requests().size() - before;
  EXPECT_EQ(once.status, 1);
  EXPECT_NE(once.err.find("s3://snapshots/templates (" + server_->endpoint() + ")"),
            std::string::npos)
      << once.err;
  EXPECT_EQ(count_of(once.err, kBuild + "/rootfs.ext4"), 1) << once.err;
  EXPECT_EQ(count_of(once.err, "\n"), 1) << once.err;
  EXPECT_NE(once.err.find("SignatureDoesNotMatch, HTTP 403: The request signature we calculated "
                          "does not match the signature you provided."),
            std::string::npos)
      << once.err;
  EXPECT_NE(once.err.find("check AWS_SECRET_ACCESS_KEY"), std::string::npos) << once.err;
  // A 403 is no passing failure: --retry does not try it again.
  Outcome retried = cat({"--retry", "3"});
  EXPECT_EQ(retried.status, 1);
  EXPECT_EQ(server_->requests().size() - before, 2 * without_retries);
  // A write refused alike leaves the object as it was.
  ASSERT_EQ(pack().status, 1);
  ::setenv("AWS_SECRET_ACCESS_KEY", testing::S3Server::kSecretAccessKey, 1);
  ASSERT_EQ(cat().status, 0);
  EXPECT_EQ(slurp(dir_ / "out"), std::string(3 * 4096, 'x'));
}

TEST_F(S3CliTest, ABucketInAnotherRegionIsNamed) {
  testing::S3Server::Options ireland;
  ireland.region = "eu-west-1";
  ASSERT_NO_FATAL_FAILURE(restart(ireland));
  Outcome wrong = pack();  // signed for us-east-1, the default
  EXPECT_EQ(wrong.status, 1);
  EXPECT_NE(wrong.err.find("bucket snapshots is in region eu-west-1, not us-east-1: set "
                           "AWS_REGION=eu-west-1"),
            std::string::npos)
      << wrong.err;
  EXPECT_NE(wrong.err.find("AuthorizationHeaderMalformed"), std::string::npos) << wrong.err;
  ::setenv("AWS_REGION", "eu-west-1", 1);
  Outcome right = pack();
  ASSERT_EQ(right.status, 0) << right.err;
  ::setenv("AWS_REGION", "us-east-1", 1);
  Outcome read = cat();
  EXPECT_EQ(read.status, 1);
  EXPECT_NE(read.err.find("set AWS_REGION=eu-west-1"), std::string::npos) << read.err;
}

// The server's clock 20 minutes ahead stands for this machine's being 20
// minutes behind.
TEST_F(S3CliTest, AClockTooFarOffIsExplained) {
  testing::S3Server::Options ahead;
  ahead.clock_skew = std::chrono::minutes(20);
  ASSERT_NO_FATAL_FAILURE(restart(ahead));
  Outcome skewed = pack();
  EXPECT_EQ(skewed.status, 1);
  EXPECT_NE(skewed.err.find("RequestTimeTooSkewed, HTTP 403: The difference between the request "
                            "time and the current time is too large."),
            std::string::npos)
      << skewed.err;
  EXPECT_NE(skewed.err.find("this machine's clock is 20 minutes behind the server's: set the "
                            "clock right"),
            std::string::npos)
      << skewed.err;
}

TEST_F(S3CliTest, ASessionTokenIsSentAndAWrongOneExplained) {
  testing::S3Server::Options temporary;
  temporary.session_token = "token-of-the-day";
  ASSERT_NO_FATAL_FAILURE(restart(temporary));
  ::setenv("AWS_SESSION_TOKEN", "token-of-the-day", 1);
  Outcome packed = pack();
  ASSERT_EQ(packed.status, 0) << packed.err;
  ASSERT_EQ(cat().status, 0);
  EXPECT_EQ(slurp(dir_ / "out"), std::string(3 * 4096, 'x'));

  ::setenv("AWS_SESSION_TOKEN", "token-of-yesterday", 1);
  Outcome wrong = cat();
  EXPECT_EQ(wrong.status, 1);
  EXPECT_NE(wrong.err.find("the session token was refused: check AWS_SESSION_TOKEN"),
            std::string::npos)
      << wrong.err;
  EXPECT_NE(wrong.err.find("InvalidToken, HTTP 400: The provided token is malformed or otherwise "
                           "invalid."),
            std::string::npos)
      << wrong.err;

  ::unsetenv("AWS_SESSION_TOKEN");
  Outcome missing = cat();
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("InvalidAccessKeyId"), std::string::npos) << missing.err;
  EXPECT_NE(missing.err.find("set AWS_SESSION_TOKEN if the key is a temporary one"),
            std::string::npos)
      << missing.err;
}

}  // namespace
}  // namespace lazyblock
