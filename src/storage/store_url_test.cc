#include "storage/store_url.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>

namespace lazyblock {
namespace {

TEST(StoreUrlTest, FileUrlsOpenAFileStore) {
  const std::filesystem::path dir = std::filesystem::path(::testing::TempDir()) /
                                    ("store_url_test_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  Result<std::shared_ptr<ObjectStore>> store = open_store("file://" + dir.string());
  ASSERT_TRUE(store) << store.status().to_string();
  EXPECT_EQ((*store)->describe(), "file://" + dir.string());

  StoreStackOptions layers;
  layers.simulate = SimulateProfile{std::chrono::milliseconds(20), 100e6};
  layers.faults = FaultSpec{};
  layers.faults->fail_open = true;
  Result<std::shared_ptr<ObjectStore>> stacked = open_store("file://" + dir.string(), layers);
  ASSERT_TRUE(stacked);
  // Faults innermost, simulation on top.
  EXPECT_EQ((*stacked)->describe(),
            "simulate(ttfb=20ms,bw=100MB/s) over faults(fail-open) over "
            "file://" +
                dir.string());
  std::filesystem::remove_all(dir);
}

TEST(StoreUrlTest, MissingDirectoryIsNotFound) {
  Result<std::shared_ptr<ObjectStore>> store = open_store("file:///nonexistent/lazyblock");
  ASSERT_FALSE(store);
  EXPECT_EQ(store.status().code(), StatusCode::kNotFound);
}

TEST(StoreUrlTest, HttpUrlsOpenAnHttpStore) {
  Result<std::shared_ptr<ObjectStore>> store = open_store("http://127.0.0.1:1/prefix/");
  ASSERT_TRUE(store) << store.status().to_string();
  EXPECT_EQ((*store)->describe(), "http://127.0.0.1:1/prefix");
  EXPECT_EQ(open_store("http:///no-host").status().code(), StatusCode::kInvalidArgument);
}

TEST(StoreUrlTest, BucketUrlsOpenAnS3Store) {
  Result<std::shared_ptr<ObjectStore>> gs = open_store("gs://bucket/some/prefix/");
  ASSERT_TRUE(gs) << gs.status().to_string();
  EXPECT_EQ((*gs)->describe().rfind("gs://bucket/some/prefix (", 0), 0u) << (*gs)->describe();
  EXPECT_EQ(open_store("s3://").status().code(), StatusCode::kInvalidArgument);
}

TEST(StoreUrlTest, OtherSchemesAreRefusedClearly) {
  for (const char* url : {"", "/data", "ftp://x", "file://"}) {
    Result<std::shared_ptr<ObjectStore>> store = open_store(url);
    ASSERT_FALSE(store) << url;
    EXPECT_EQ(store.status().code(), StatusCode::kInvalidArgument) << url;
  }
}

}  // namespace
}  // namespace lazyblock
