// Reads of a device assembled from two builds' data files and zeros, on a
// real file store.
#include "image/device.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <optional>

#include "cache/block_cache.h"
#include "common/units.h"
#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "testing/unnamed_files.h"

namespace lazyblock::image {
namespace {

constexpr uint64_t kBlock = 4096;

Uuid id(uint8_t fill) {
  Uuid u;
  u.bytes.fill(fill);
  return u;
}

// Collects what write_to writes, zeros included.
class StringSink final : public ByteSink {
 public:
  Status write(std::span<const std::byte> data) override {
    bytes.append(reinterpret_cast<const char*>(data.data()), data.size());
    return Status::ok();
  }
  std::string bytes;
};

class DeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    Result<std::shared_ptr<FileStore>> files = FileStore::open(scratch_->path());
    ASSERT_TRUE(files);
    store_ = *files;
    // The parent's data file: pattern 1; the child's: pattern 2.
    ASSERT_TRUE(
        store_
            ->put(data_key(parent_, "memfile"), testing::make_pattern(1, 0, 8 * kMiB), IoContext{})
            .is_ok());
    ASSERT_TRUE(
        store_->put(data_key(child_, "memfile"), testing::make_pattern(2, 0, 2 * kMiB), IoContext{})
            .is_ok());
    // Device (5 MiB + 100 bytes): [0, 1 MiB) child at 1 MiB; [1, 2 MiB)
    // zeros; [2 MiB, end) parent at 3 MiB.
    header_.block_size = kBlock;
    header_.size = 5 * kMiB + 100;
    header_.generation = 1;
    header_.build_id = child_;
    header_.base_build_id = parent_;
    header_.mappings = {{0, 1 * kMiB, child_, 1 * kMiB},
                        {1 * kMiB, 1 * kMiB, Uuid::nil(), 0},
                        {2 * kMiB, 3 * kMiB + kBlock, parent_, 3 * kMiB}};
    Result<std::vector<std::byte>> bytes = header_.serialize();
    ASSERT_TRUE(bytes) << bytes.status().to_string();
    ASSERT_TRUE(store_->put(header_key(child_, "memfile"), *bytes, IoContext{}).is_ok());
    expected_ = expected_device();
  }

  std::string expected_device() const {
    std::string bytes(header_.size, '\0');
    const auto copy = [&](uint64_t at, uint64_t seed, uint64_t from, uint64_t length) {
      const std::vector<std::byte> data = testing::make_pattern(seed, from, length);
      std::memcpy(bytes.data() + at, data.data(), length);
    };
    copy(0, 2, 1 * kMiB, 1 * kMiB);
    copy(2 * kMiB, 1, 3 * kMiB, header_.size - 2 * kMiB);
    return bytes;
  }

  std::unique_ptr<Device> open() {
    auto files = std::make_shared<DataFiles>(store_, ChunkerOptions{});
    Result<std::unique_ptr<Device>> device = Device::open(files, child_, "memfile");
    EXPECT_TRUE(device) << device.status().to_string();
    return device ? std::move(device).value() : nullptr;
  }

  std::optional<testing::ScratchDir> scratch_;
  std::shared_ptr<FileStore> store_;
  const Uuid parent_ = id(0x11);
  const Uuid child_ = id(0x22);
  Header header_;
  std::string expected_;
};

TEST_F(DeviceTest, ReadsSplitAlongTheMappings) {
  auto device = open();
  ASSERT_TRUE(device);
  EXPECT_EQ(device->size(), header_.size);
  for (const auto& [offset, length] :
       std::vector<std::pair<uint64_t, uint64_t>>{{0, 100},
                                                  {1 * kMiB - 10, 20},
                                                  {2 * kMiB - 5, 10},
                                                  {1 * kMiB - 3, 2 * kMiB},
                                                  {5 * kMiB, 4096},
                                                  {5 * kMiB + 99, 1},
                                                  {5 * kMiB + 100, 10},
                                                  {0, 6 * kMiB}}) {
    std::string buffer(length, 'x');
    Result<size_t> got =
        device->read(std::as_writable_bytes(std::span(buffer.data(), buffer.size())), offset);
    ASSERT_TRUE(got) << got.status().to_string();
    const uint64_t want = offset >= header_.size ? 0 : std::min(length, header_.size - offset);
    ASSERT_EQ(*got, want) << offset;
    EXPECT_TRUE(buffer.substr(0, want) == expected_.substr(offset, want)) << offset;
  }
}

// read_cached copies what is here now, across mappings and zeros too, and
// fetches nothing: a range not yet read is refused until a read brings it.
TEST_F(DeviceTest, ReadCachedCopiesOnlyWhatIsHereAcrossMappings) {
  auto device = open();
  ASSERT_TRUE(device);
  // The child's last block, the zero mapping, the parent's first block.
  const uint64_t offset = 1 * kMiB - kBlock;
  std::vector<std::byte> buffer(1 * kMiB + 2 * kBlock);
  EXPECT_FALSE(device->read_cached(buffer, offset)) << "nothing was read yet";
  EXPECT_FALSE(device->read_cached(buffer, header_.size - kBlock)) << "past the end";
  std::vector<std::byte> read(buffer.size());
  ASSERT_TRUE(device->read(read, offset));
  ASSERT_TRUE(device->read_cached(buffer, offset));
  EXPECT_EQ(std::memcmp(buffer.data(), expected_.data() + offset, buffer.size()), 0);
  std::vector<std::byte> zeros(kBlock, std::byte{1});
  ASSERT_TRUE(device->read_cached(zeros, 1 * kMiB + kBlock)) << "a zero mapping needs no fetch";
  EXPECT_EQ(std::count(zeros.begin(), zeros.end(), std::byte{0}), static_cast<long>(kBlock));
}

TEST_F(DeviceTest, ViewsWithinOneMappingAndNoneAcross) {
  auto device = open();
  ASSERT_TRUE(device);
  Result<std::optional<std::span<const std::byte>>> data = device->view(2 * kMiB + kBlock, kBlock);
  ASSERT_TRUE(data) << data.status().to_string();
  ASSERT_TRUE(*data);
  EXPECT_EQ(std::memcmp((*data)->data(), expected_.data() + 2 * kMiB + kBlock, kBlock), 0);
  Result<std::optional<std::span<const std::byte>>> zeros = device->view(1 * kMiB, 1 * kMiB);
  ASSERT_TRUE(zeros && *zeros);
  EXPECT_EQ((*zeros)->size(), 1 * kMiB);
  EXPECT_EQ(std::count((*zeros)->begin(), (*zeros)->end(), std::byte{0}),
            static_cast<long>(1 * kMiB));
  // Across mappings the bytes are not contiguous: no view, and no error;
  // read copies them.
  Result<std::optional<std::span<const std::byte>>> across =
      device->view(1 * kMiB - kBlock, 2 * kBlock);
  ASSERT_TRUE(across) << across.status().to_string();
  EXPECT_FALSE(*across);
  std::vector<std::byte> copied(2 * kBlock);
  Result<size_t> got = device->read(copied, 1 * kMiB - kBlock);
  ASSERT_TRUE(got) << got.status().to_string();
  ASSERT_EQ(*got, 2 * kBlock);
  EXPECT_EQ(std::memcmp(copied.data(), expected_.data() + 1 * kMiB - kBlock, 2 * kBlock), 0);
  // The extent table, clipped to the range asked for.
  Result<std::vector<DiskExtent>> extents =
      device->extents(1 * kMiB - kBlock, 1 * kMiB + 2 * kBlock);
  ASSERT_TRUE(extents);
  ASSERT_EQ(extents->size(), 3u);
  EXPECT_EQ((*extents)[0], (DiskExtent{1 * kMiB - kBlock, kBlock, DiskExtent::Kind::kData}));
  EXPECT_EQ((*extents)[1], (DiskExtent{1 * kMiB, 1 * kMiB, DiskExtent::Kind::kZero}));
  EXPECT_EQ((*extents)[2], (DiskExtent{2 * kMiB, kBlock, DiskExtent::Kind::kData}));
}

TEST_F(DeviceTest, WriteToGivesTheWholeDevice) {
  auto device = open();
  ASSERT_TRUE(device);
  StringSink sink;
  ASSERT_TRUE(device->write_to(sink).is_ok());
  EXPECT_TRUE(sink.bytes == expected_);
}

// The parent's cache file cut short between two passes of write_to: the
// second pass reads short where its blocks were, fetches them again and
// gives the whole device byte-exact (from a view of the map, the sink's
// copy would fault, or read zeros once a fetch extended the file).
TEST_F(DeviceTest, WriteToOverACacheFileCutShortFetchesWhatWasLost) {
  auto device = open();
  ASSERT_TRUE(device);
  StringSink warm;
  ASSERT_TRUE(device->write_to(warm).is_ok());
  const std::filesystem::path file =
      testing::unnamed_file_of_size(::getpid(), BlockCache::file_size_for(8 * kMiB));
  ASSERT_FALSE(file.empty()) << "no cache file of the parent's data file";
  ASSERT_EQ(::truncate(file.c_str(), static_cast<off_t>(3 * kMiB)), 0) << std::strerror(errno);
  StringSink sink;
  const Status status = device->write_to(sink);
  ASSERT_TRUE(status.is_ok()) << status.to_string();
  EXPECT_TRUE(sink.bytes == expected_) << "wrong bytes";
}

TEST_F(DeviceTest, ADataFileShorterThanItsMappingsIsCorruption) {
  ASSERT_TRUE(
      store_->put(data_key(parent_, "memfile"), testing::make_pattern(1, 0, 4 * kMiB), IoContext{})
          .is_ok());
  auto device = open();
  ASSERT_TRUE(device);
  std::string buffer(4096, '\0');
  Result<size_t> got =
      device->read(std::as_writable_bytes(std::span(buffer.data(), buffer.size())), 4 * kMiB);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kCorruption);
  EXPECT_NE(got.status().message().find(data_key(parent_, "memfile")), std::string::npos)
      << got.status().to_string();
}

TEST_F(DeviceTest, AHeaderOfAnotherBuildIsRefused) {
  Result<Header> header = load_header(*store_, child_, "memfile", std::chrono::seconds(5));
  ASSERT_TRUE(header);
  ASSERT_TRUE(
      store_->put(header_key(parent_, "memfile"), *header->serialize(), IoContext{}).is_ok());
  Result<Header> wrong = load_header(*store_, parent_, "memfile", std::chrono::seconds(5));
  ASSERT_FALSE(wrong);
  EXPECT_EQ(wrong.status().code(), StatusCode::kCorruption);
  EXPECT_NE(wrong.status().message().find("belongs to build"), std::string::npos);
}

}  // namespace
}  // namespace lazyblock::image
