#include "storage/file_store.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <optional>
#include <vector>

#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

using testing::first_pattern_mismatch;
using testing::make_pattern;

class FileStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    std::filesystem::create_directories(dir_ / "root");
    Result<std::shared_ptr<FileStore>> opened = FileStore::open(dir_ / "root");
    ASSERT_TRUE(opened) << opened.status().to_string();
    store_ = *opened;
  }

  // Reads the whole range through `reader`, in reads of at most `step` bytes.
  static std::vector<std::byte> drain(RangeReader& reader, size_t step = 1000) {
    std::vector<std::byte> out;
    std::vector<std::byte> buffer(step);
    for (;;) {
      Result<size_t> got = reader.read(buffer);
      EXPECT_TRUE(got) << got.status().to_string();
      if (!got || *got == 0) return out;
      out.insert(out.end(), buffer.begin(), buffer.begin() + static_cast<long>(*got));
    }
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::shared_ptr<FileStore> store_;
};

TEST_F(FileStoreTest, PutThenReadRanges) {
  ASSERT_TRUE(store_->put("build/memfile", make_pattern(1, 0, 10000), IoContext{}).is_ok());
  Result<uint64_t> size = store_->stat("build/memfile", IoContext{});
  ASSERT_TRUE(size);
  EXPECT_EQ(*size, 10000u);

  Result<std::unique_ptr<RangeReader>> reader =
      store_->open_range("build/memfile", 1234, 5000, IoContext{});
  ASSERT_TRUE(reader) << reader.status().to_string();
  EXPECT_EQ((*reader)->object_size(), 10000u);
  EXPECT_EQ((*reader)->range_length(), 5000u);
  std::vector<std::byte> bytes = drain(**reader);
  ASSERT_EQ(bytes.size(), 5000u);
  EXPECT_EQ(first_pattern_mismatch(1, 1234, bytes), 5000u);
}

TEST_F(FileStoreTest, RangesAreClippedAtTheEnd) {
  ASSERT_TRUE(store_->put("obj", make_pattern(2, 0, 3000), IoContext{}).is_ok());
  auto reader = store_->open_range("obj", 2000, 5000, IoContext{});
  ASSERT_TRUE(reader);
  EXPECT_EQ((*reader)->range_length(), 1000u);
  EXPECT_EQ(drain(**reader).size(), 1000u);

  auto at_end = store_->open_range("obj", 3000, 10, IoContext{});
  ASSERT_TRUE(at_end);
  EXPECT_EQ((*at_end)->range_length(), 0u);
  EXPECT_TRUE(drain(**at_end).empty());

  auto past_end = store_->open_range("obj", 3001, 10, IoContext{});
  ASSERT_FALSE(past_end);
  EXPECT_EQ(past_end.status().code(), StatusCode::kOutOfRange);
}

TEST_F(FileStoreTest, MissingObjectIsNotFound) {
  auto reader = store_->open_range("no/such", 0, 10, IoContext{});
  ASSERT_FALSE(reader);
  EXPECT_EQ(reader.status().code(), StatusCode::kNotFound);
  // The store and the key, each named once.
  const std::string expected = store_->describe() + ": object not found: no/such";
  EXPECT_EQ(reader.status().message(), expected);
  Result<uint64_t> size = store_->stat("no/such", IoContext{});
  ASSERT_FALSE(size);
  EXPECT_EQ(size.status().message(), expected);
  EXPECT_EQ(store_->remove("no/such", IoContext{}).code(), StatusCode::kNotFound);
}

TEST_F(FileStoreTest, DirectoriesAreNotObjects) {
  ASSERT_TRUE(store_->put("a/b", make_pattern(3, 0, 10), IoContext{}).is_ok());
  EXPECT_EQ(store_->stat("a", IoContext{}).status().code(), StatusCode::kNotFound);
  EXPECT_EQ(store_->open_range("a", 0, 1, IoContext{}).status().code(), StatusCode::kNotFound);
}

TEST_F(FileStoreTest, PutReplacesAndRemoveRemoves) {
  ASSERT_TRUE(store_->put("obj", make_pattern(4, 0, 100), IoContext{}).is_ok());
  ASSERT_TRUE(store_->put("obj", make_pattern(5, 0, 50), IoContext{}).is_ok());
  auto reader = store_->open_range("obj", 0, 100, IoContext{});
  ASSERT_TRUE(reader);
  std::vector<std::byte> bytes = drain(**reader);
  ASSERT_EQ(bytes.size(), 50u);
  EXPECT_EQ(first_pattern_mismatch(5, 0, bytes), 50u);
  ASSERT_TRUE(store_->remove("obj", IoContext{}).is_ok());
  EXPECT_EQ(store_->stat("obj", IoContext{}).status().code(), StatusCode::kNotFound);
  // No temporary file is left beside the object.
  EXPECT_TRUE(std::filesystem::is_empty(dir_ / "root"));
}

TEST_F(FileStoreTest, KeysMayNotLeaveTheRoot) {
  std::ofstream(dir_ / "secret") << "outside";
  std::filesystem::create_directory_symlink(dir_, dir_ / "root" / "escape");
  std::filesystem::create_symlink(dir_ / "secret", dir_ / "root" / "link");
  for (const char* key : {"../secret", "/etc/passwd", "a/../../secret", "./x", "a//b", "", "a/",
                          "escape/secret", "link"}) {
    auto reader = store_->open_range(key, 0, 10, IoContext{});
    EXPECT_FALSE(reader) << "key '" << key << "' was accepted";
    if (!reader) {
      EXPECT_TRUE(reader.status().code() == StatusCode::kInvalidArgument ||
                  reader.status().code() == StatusCode::kNotFound)
          << key << ": " << reader.status().to_string();
    }
    EXPECT_FALSE(store_->stat(key, IoContext{})) << key;
  }
  EXPECT_EQ(store_->open_range("escape/secret", 0, 10, IoContext{}).status().code(),
            StatusCode::kInvalidArgument);
  EXPECT_FALSE(store_->put("../planted", make_pattern(6, 0, 10), IoContext{}).is_ok());
  EXPECT_FALSE(std::filesystem::exists(dir_ / "planted"));
}

TEST_F(FileStoreTest, OpeningAMissingRootFails) {
  Result<std::shared_ptr<FileStore>> opened = FileStore::open(dir_ / "nope");
  ASSERT_FALSE(opened);
  EXPECT_NE(opened.status().message().find("nope"), std::string::npos);
}

TEST_F(FileStoreTest, DescribeNamesTheRoot) {
  EXPECT_EQ(store_->describe(), "file://" + (dir_ / "root").string());
}

TEST_F(FileStoreTest, TheLocationIsTheSameHoweverTheRootIsSpelled) {
  std::filesystem::create_directories(dir_ / "elsewhere");
  Result<std::shared_ptr<FileStore>> spelled = FileStore::open(dir_ / "elsewhere" / ".." / "root");
  ASSERT_TRUE(spelled) << spelled.status().to_string();
  EXPECT_EQ((*spelled)->location(), store_->location());
  Result<std::shared_ptr<FileStore>> other = FileStore::open(dir_ / "elsewhere");
  ASSERT_TRUE(other) << other.status().to_string();
  EXPECT_NE((*other)->location(), store_->location());
}

TEST_F(FileStoreTest, AnObjectsVersionChangesWhenItIsWrittenAgain) {
  ASSERT_TRUE(store_->put("obj", make_pattern(1, 0, 5000), IoContext{}).is_ok());
  Result<ObjectInfo> first = store_->stat_info("obj", IoContext{});
  ASSERT_TRUE(first) << first.status().to_string();
  EXPECT_EQ(first->size, 5000u);
  EXPECT_FALSE(first->version.empty());
  auto reader = store_->open_range("obj", 10, 10, IoContext{});
  ASSERT_TRUE(reader);
  EXPECT_EQ((*reader)->object_version(), first->version) << "a stat and a read agree";
  // The same bytes put again are a new file: a new version.
  ASSERT_TRUE(store_->put("obj", make_pattern(1, 0, 5000), IoContext{}).is_ok());
  Result<ObjectInfo> second = store_->stat_info("obj", IoContext{});
  ASSERT_TRUE(second);
  EXPECT_NE(second->version, first->version);
  EXPECT_EQ(store_->stat_info("obj", IoContext{})->version, second->version) << "stable";
}

}  // namespace
}  // namespace lazyblock
