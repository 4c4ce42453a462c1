// Compressed builds written by an independent implementation of E2B's
// formats (tests/e2b_reference/e2b.py, from E2B's Go code) read back through
// lazyblock: export, serve nbd, and the fetches a cold read makes.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "common/units.h"
#include "image/device.h"
#include "storage/file_store.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

const std::string kName = "rootfs.ext4";

std::string build_id(int generation) {
  return "6c6c6c6c-1111-4222-8333-" + std::string(10, '0') + std::to_string(10 + generation);
}

class CompressedTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists("/usr/bin/python3")) GTEST_SKIP() << "no /usr/bin/python3";
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    std::filesystem::create_directories(dir_ / "store");
    store_ = "file://" + (dir_ / "store").string();
    Outcome probe = run_program(dir_, "/usr/bin/python3", {"-c", "import lz4.frame, zstandard"});
    if (probe.status != 0) GTEST_SKIP() << "python3-lz4 and python3-zstandard are not installed";
  }

  // A disk-like image: random blocks, zero blocks, repeated text.
  std::string image(uint64_t size, uint64_t seed, const std::string* parent = nullptr) {
    std::mt19937_64 rng(seed);
    std::string bytes = parent != nullptr ? *parent : std::string(size, '\0');
    bytes.resize(size);
    for (uint64_t block = 0; block < size / 4096; ++block) {
      if (parent != nullptr && rng() % 4 != 0) continue;  // a child changes a quarter
      const uint64_t kind = rng() % 3;
      for (uint64_t i = 0; i < 4096; ++i) {
        char& c = bytes[block * 4096 + i];
        c = kind == 0 ? '\0' : kind == 1 ? static_cast<char>(rng()) : "lazyblock "[i % 10];
      }
    }
    return bytes;
  }

  void write_build(int generation, std::optional<int> parent, const std::string& bytes,
                   const std::string& codec, int version, const std::string& block_size) {
    const std::filesystem::path raw = dir_ / ("image-" + std::to_string(generation));
    std::ofstream(raw, std::ios::binary) << bytes;
    std::vector<std::string> args = {std::string(LAZYBLOCK_E2B_REFERENCE), "write", "--store",
                                     (dir_ / "store").string(), "--build", build_id(generation),
                                     "--name", kName, "--block-size", block_size, "--codec",
                                     codec, "--version", std::to_string(version), raw.string()};
    if (parent) {
      args.insert(args.end() - 1, {"--parent", build_id(*parent)});
    }
    Outcome wrote = run_program(dir_, "/usr/bin/python3", args);
    ASSERT_EQ(wrote.status, 0) << wrote.err;
  }

  std::string exported(int generation) {
    const std::filesystem::path out = dir_ / ("out-" + std::to_string(generation));
    Outcome run = run_lazyblock(dir_, {"export", "--store", store_, "--build", build_id(generation),
                                       "--name", kName, "-o", out.string()});
    EXPECT_EQ(run.status, 0) << run.err;
    return slurp(out);
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::string store_;
};

TEST_F(CompressedTest, ChainsMixingVersionsAndCodecsExportByteExact) {
  struct Step {
    std::string codec;
    int version;
  };
  for (const std::string block_size : {"4096", "2MiB"}) {
    // A v3 header cannot map into a compressed build (it has no frame tables),
    // so version 3 comes first, as it does in E2B's buckets.
    const std::vector<Step> chain = {{"none", 3}, {"zstd", 4}, {"lz4", 5}, {"none", 4}, {"zstd", 5}};
    std::vector<std::string> images;
    const int base = block_size == "4096" ? 0 : 10;
    for (size_t g = 0; g < chain.size(); ++g) {
      images.push_back(image(6 * kMiB + (block_size == "4096" ? 8192 : 0), 40 + g,
                             g == 0 ? nullptr : &images.back()));
      write_build(base + static_cast<int>(g),
                  g == 0 ? std::nullopt : std::optional<int>(base + static_cast<int>(g) - 1),
                  images.back(), chain[g].codec, chain[g].version, block_size);
    }
    for (size_t g = 0; g < chain.size(); ++g) {
      EXPECT_TRUE(exported(base + static_cast<int>(g)) == images[g])
          << "generation " << g << " (" << chain[g].codec << ", v" << chain[g].version
          << ", blocks of " << block_size << ")";
    }
  }
}

TEST_F(CompressedTest, AColdPageReadFetchesExactlyOneFrame) {
  const std::string bytes = image(8 * kMiB, 7);
  write_build(0, std::nullopt, bytes, "zstd", 4, "4096");
  Result<std::shared_ptr<FileStore>> store = FileStore::open(dir_ / "store");
  ASSERT_TRUE(store);
  ChunkerOptions options;
  options.readahead = false;
  auto files = std::make_shared<image::DataFiles>(*store, options);
  Result<image::Uuid> build = image::Uuid::parse(build_id(0));
  ASSERT_TRUE(build);
  Result<std::unique_ptr<image::Device>> device = image::Device::open(files, *build, kName);
  ASSERT_TRUE(device) << device.status().to_string();
  const image::BuildInfo* info = (*device)->header().find_build(*build);
  ASSERT_NE(info, nullptr);
  ASSERT_TRUE(info->frame_table.compressed());
  // A page of the device in the third frame of the data file.
  const image::Header& header = (*device)->header();
  uint64_t device_offset = UINT64_MAX, stored_at = 0;
  for (const image::Mapping& m : header.mappings) {
    if (m.build_id.is_nil() || m.build_storage_offset + m.length <= 4 * kMiB + 4096) continue;
    const uint64_t skip = m.build_storage_offset >= 4 * kMiB ? 0 : 4 * kMiB - m.build_storage_offset;
    device_offset = m.offset + skip;
    stored_at = m.build_storage_offset + skip;
    break;
  }
  ASSERT_NE(device_offset, UINT64_MAX);
  std::vector<std::byte> page(4096);
  ASSERT_TRUE((*device)->read(page, device_offset));
  EXPECT_TRUE(std::equal(page.begin(), page.end(),
                         reinterpret_cast<const std::byte*>(bytes.data()) + device_offset));
  const std::optional<size_t> frame = info->frame_table.find(stored_at);
  ASSERT_TRUE(frame);
  const ChunkerStats stats = files->stats().at(*build);
  EXPECT_EQ(stats.requests, 1u);
  EXPECT_EQ(stats.bytes, info->frame_table.frames[*frame].size_c);
}

TEST_F(CompressedTest, ServeNbdServesACompressedBuild) {
  const std::string bytes = image(6 * kMiB, 9);
  write_build(0, std::nullopt, bytes, "lz4", 5, "4096");
  const std::filesystem::path socket = dir_ / "nbd.sock";
  ServerProcess server(dir_, {"serve", "nbd", "--store", store_, "--build", build_id(0), "--name",
                              kName, "--socket", socket.string(), "--read-only"},
                       socket);
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  Outcome copied = run_program(dir_, "nbdcopy", {"nbd+unix:///" + kName + "?socket=" + socket.string(),
                                                 (dir_ / "copy").string()});
  ASSERT_EQ(copied.status, 0) << copied.err;
  EXPECT_TRUE(slurp(dir_ / "copy") == bytes);
  EXPECT_EQ(server.stop(), 0);
}

}  // namespace
}  // namespace lazyblock
