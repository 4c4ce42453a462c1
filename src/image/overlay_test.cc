#include "image/overlay.h"

#include <fcntl.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <random>
#include <thread>
#include <vector>

#include "common/unique_fd.h"
#include "storage/file_store.h"
#include "testing/scratch_dir.h"

namespace lazyblock::image {
namespace {

constexpr uint64_t kBlock = 4096;
constexpr uint64_t kBlocks = 64;

class OverlayTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    Result<std::shared_ptr<FileStore>> store = FileStore::open(scratch_->path());
    ASSERT_TRUE(store);
    files_ = std::make_shared<DataFiles>(*store, ChunkerOptions{});
    // A device that reads as zeros: every base byte is 0.
    Header header;
    header.block_size = kBlock;
    header.size = kBlocks * kBlock;
    header.build_id = Uuid::random();
    header.base_build_id = header.build_id;
    header.mappings = {{0, header.size, Uuid::nil(), 0}};
    device_ = std::make_unique<Device>(files_, header, "rootfs.ext4");
  }

  std::vector<std::byte> block_of(const Overlay& overlay, uint64_t index) {
    std::vector<std::byte> bytes(kBlock);
    Result<size_t> got = const_cast<Overlay&>(overlay).read(bytes, index * kBlock);
    EXPECT_TRUE(got);
    return bytes;
  }

  std::optional<testing::ScratchDir> scratch_;
  std::shared_ptr<DataFiles> files_;
  std::unique_ptr<Device> device_;
};

std::vector<std::byte> filled(size_t size, uint8_t value) {
  return std::vector<std::byte>(size, std::byte{value});
}

// A whole-block write and a partial write racing on blocks not yet in the
// overlay: the partial one must never put the device's bytes back over the
// whole one (the outcome must be one of the two serial orders).
TEST_F(OverlayTest, WholeAndPartialWritesToOneBlockAreAtomic) {
  constexpr uint64_t kPartAt = 100, kPartLength = 500;
  std::mt19937 rng(1);
  for (int round = 0; round < 20; ++round) {
    Result<std::unique_ptr<Overlay>> overlay =
        Overlay::open(*device_, std::nullopt, scratch_->path());
    ASSERT_TRUE(overlay) << overlay.status().to_string();
    std::vector<uint64_t> order(kBlocks);
    for (uint64_t i = 0; i < kBlocks; ++i) order[i] = i;
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      std::shuffle(order.begin(), order.end(), rng);
      threads.emplace_back([&, order, t] {
        for (uint64_t block : order) {
          const Status status =
              t % 2 == 0 ? (*overlay)->write(filled(kBlock, 0xAA), block * kBlock)
                         : (*overlay)->write(filled(kPartLength, 0xBB), block * kBlock + kPartAt);
          ASSERT_TRUE(status.is_ok()) << status.to_string();
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    for (uint64_t block = 0; block < kBlocks; ++block) {
      const std::vector<std::byte> bytes = block_of(**overlay, block);
      for (uint64_t i = 0; i < kBlock; ++i) {
        const bool in_part = i >= kPartAt && i < kPartAt + kPartLength;
        const std::byte b = bytes[i];
        ASSERT_TRUE(b == std::byte{0xAA} || (in_part && b == std::byte{0xBB}))
            << "round " << round << " block " << block << " byte " << i << " is "
            << static_cast<int>(b) << ": a write was lost";
      }
    }
  }
}

// Overlapping multi-block writes: each shared block comes from one write,
// and the shared blocks of a pair all come from the same one.
TEST_F(OverlayTest, OverlappingWritesEachLandWhole) {
  for (int round = 0; round < 50; ++round) {
    Result<std::unique_ptr<Overlay>> overlay =
        Overlay::open(*device_, std::nullopt, scratch_->path());
    ASSERT_TRUE(overlay);
    std::thread first(
        [&] { ASSERT_TRUE((*overlay)->write(filled(8 * kBlock + 300, 1), 0).is_ok()); });
    std::thread second(
        [&] { ASSERT_TRUE((*overlay)->write(filled(8 * kBlock, 2), 4 * kBlock + 300).is_ok()); });
    first.join();
    second.join();
    std::vector<std::byte> shared(4 * kBlock + 0);
    ASSERT_TRUE((*overlay)->read(shared, 4 * kBlock + 300));
    const std::byte winner = shared[0];
    for (size_t i = 0; i < shared.size(); ++i) {
      ASSERT_EQ(shared[i], winner)
          << "round " << round << ": bytes of two writes interleave at " << i;
    }
  }
}

TEST_F(OverlayTest, AKeptOverlayComesBackAsOfItsLastFlushAndSurvivesATornMap) {
  const std::filesystem::path path = scratch_->path() / "vm.overlay";
  {
    Result<std::unique_ptr<Overlay>> overlay = Overlay::open(*device_, path);
    ASSERT_TRUE(overlay) << overlay.status().to_string();
    ASSERT_TRUE((*overlay)->write(filled(kBlock, 1), 1 * kBlock).is_ok());
    ASSERT_TRUE((*overlay)->flush().is_ok());
    ASSERT_TRUE((*overlay)->write(filled(kBlock, 2), 2 * kBlock).is_ok());
    ASSERT_TRUE((*overlay)->flush().is_ok());
  }
  {
    Result<std::unique_ptr<Overlay>> overlay = Overlay::open(*device_, path);
    ASSERT_TRUE(overlay);
    EXPECT_TRUE((*overlay)->has_block(1));
    EXPECT_TRUE((*overlay)->has_block(2));
  }
  // The map's newest slot torn (as by a crash mid-save): the slot before it
  // holds, and with it every write of the flush before.
  const std::filesystem::path map = OverlayMap::path_for(path);
  UniqueFd map_file(::open(map.c_str(), O_RDWR));
  const int fd = map_file.get();
  ASSERT_GE(fd, 0);
  const uint64_t slot_bytes = std::filesystem::file_size(map) / 2;
  uint64_t sequence[2];
  for (int slot = 0; slot < 2; ++slot) {
    ASSERT_EQ(::pread(fd, &sequence[slot], 8, static_cast<off_t>(slot * slot_bytes + 8)), 8);
  }
  const int newest = sequence[1] > sequence[0] ? 1 : 0;
  const char junk[16] = {'t', 'o', 'r', 'n'};
  ASSERT_EQ(::pwrite(fd, junk, sizeof junk, static_cast<off_t>(newest * slot_bytes + 20)), 16);
  map_file.reset();
  Result<std::unique_ptr<Overlay>> reopened = Overlay::open(*device_, path);
  ASSERT_TRUE(reopened) << reopened.status().to_string();
  EXPECT_TRUE((*reopened)->has_block(1));
  EXPECT_EQ(block_of(**reopened, 1), filled(kBlock, 1));
}

TEST_F(OverlayTest, AKeptOverlayIsRefusedOverAnotherDevice) {
  const std::filesystem::path path = scratch_->path() / "vm.overlay";
  ASSERT_TRUE(Overlay::open(*device_, path));
  Header other = device_->header();
  other.build_id = Uuid::random();
  other.base_build_id = other.build_id;
  Device another(files_, other, "rootfs.ext4");
  Result<std::unique_ptr<Overlay>> refused = Overlay::open(another, path);
  ASSERT_FALSE(refused);
  EXPECT_NE(refused.status().message().find(device_->header().build_id.to_string()),
            std::string::npos);
  EXPECT_NE(refused.status().message().find(other.build_id.to_string()), std::string::npos);
  // A file that is not an overlay is never taken over.
  const std::filesystem::path plain = scratch_->path() / "plain.img";
  { std::ofstream(plain) << "user data"; }
  EXPECT_FALSE(Overlay::open(*device_, plain));
  EXPECT_EQ(std::filesystem::file_size(plain), 9u);
}

}  // namespace
}  // namespace lazyblock::image
