// lazyblock against a real S3-API server on 127.0.0.1: packing into a bucket
// (multipart for large data files), exporting and cat-ing back byte-exact,
// and a second process served by --cache-dir once the server is gone.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>

#include "common/units.h"
#include "testing/s3_server.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

const std::string kBuild = "5e5e5e5e-1111-4222-8333-444455556666";

class S3CliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<std::unique_ptr<testing::S3Server>> server = testing::S3Server::start({"snapshots"});
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    // The child processes read their configuration from the environment.
    ::setenv("AWS_ENDPOINT_URL", server_->endpoint().c_str(), 1);
    ::setenv("AWS_ACCESS_KEY_ID", testing::S3Server::kAccessKeyId, 1);
    ::setenv("AWS_SECRET_ACCESS_KEY", testing::S3Server::kSecretAccessKey, 1);
  }
  void TearDown() override {
    ::unsetenv("AWS_ENDPOINT_URL");
    ::unsetenv("AWS_ACCESS_KEY_ID");
    ::unsetenv("AWS_SECRET_ACCESS_KEY");
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

  Outcome exported = run_lazyblock(dir_, {"export", "--store", store_, "--build", kBuild,
                                          "--name", "rootfs.ext4", "-o", (dir_ / "out").string()});
  ASSERT_EQ(exported.status, 0) << exported.err;
  EXPECT_TRUE(slurp(dir_ / "out") == raw);

  // The data file, raw, with a persistent cache; then a second process
  // reads it from the cache, asking the server only its size and version
  // (every stream it opened would fail at its first byte).
  const std::string cache_dir = (dir_ / "chunks").string();
  Outcome first = run_lazyblock(dir_, {"cat", "--store", store_, "--key", kBuild + "/rootfs.ext4",
                                       "--cache-dir", cache_dir, "-o", (dir_ / "data1").string()});
  ASSERT_EQ(first.status, 0) << first.err;
  Outcome second = run_lazyblock(dir_, {"cat", "--store", store_, "--key", kBuild + "/rootfs.ext4",
                                        "--cache-dir", cache_dir, "--faults", "fail-after=0",
                                        "--retry", "0", "-o", (dir_ / "data2").string()});
  ASSERT_EQ(second.status, 0) << second.err;
  EXPECT_TRUE(slurp(dir_ / "data2") == slurp(dir_ / "data1"));
  EXPECT_GT(std::filesystem::file_size(dir_ / "data2"), 30 * kMiB);
}

TEST_F(S3CliTest, MissingObjectsAndBucketsAreExplained) {
  Outcome missing = run_lazyblock(dir_, {"cat", "--store", store_, "--key", "no/such"});
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("object not found: no/such"), std::string::npos) << missing.err;
  Outcome no_bucket =
      run_lazyblock(dir_, {"cat", "--store", "s3://no-such-bucket", "--key", "x", "--retry", "0"});
  EXPECT_EQ(no_bucket.status, 1);
  EXPECT_NE(no_bucket.err.find("the bucket does not exist"), std::string::npos) << no_bucket.err;
}

}  // namespace
}  // namespace lazyblock
