// pack, export and inspect as a user runs them, on a file store: round trips
// through chains of generations, the header's bytes, storage efficiency,
// and damaged headers.
#include <gtest/gtest.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/units.h"
#include "image/device.h"
#include "storage/file_store.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

constexpr uint64_t kBlock = 4096;

// Fixed build ids, so the tests can name and find them.
std::string build_id(int generation) {
  return "0000000" + std::to_string(generation) + "-1111-4222-8333-444455556666";
}

class ImageCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch) << scratch.status().to_string();
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    std::filesystem::create_directories(dir_ / "store");
    store_url_ = "file://" + (dir_ / "store").string();
  }

  std::filesystem::path write_raw(const std::string& name, const std::string& bytes) {
    const std::filesystem::path path = dir_ / name;
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }

  Outcome pack(int generation, const std::filesystem::path& raw, std::optional<int> parent,
               std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {
        "pack",   "--store",     store_url_,  "--build", build_id(generation),
        "--name", "rootfs.ext4", raw.string()};
    if (parent) {
      args.push_back("--parent");
      args.push_back(build_id(*parent));
    }
    args.insert(args.end(), extra.begin(), extra.end());
    return run_lazyblock(dir_, args);
  }

  Outcome export_to(int generation, const std::filesystem::path& output) {
    return run_lazyblock(dir_, {"export", "--store", store_url_, "--build", build_id(generation),
                                "--name", "rootfs.ext4", "-o", output.string()});
  }

  std::filesystem::path stored(int generation, const std::string& suffix = "") {
    return dir_ / "store" / build_id(generation) / ("rootfs.ext4" + suffix);
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::string store_url_;
};

// `blocks` blocks plus `tail` bytes: random data, with every third block
// zeros (holes).
std::string image_with_holes(uint64_t blocks, uint64_t tail, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string bytes(blocks * kBlock + tail, '\0');
  for (uint64_t block = 0; block * kBlock < bytes.size(); ++block) {
    if (block % 3 == 1) continue;
    for (uint64_t i = block * kBlock; i < std::min<uint64_t>(bytes.size(), (block + 1) * kBlock);
         ++i) {
      bytes[i] = static_cast<char>(rng());
    }
  }
  return bytes;
}

// Changes `count` random blocks of `bytes`: to new random data, or (one in
// four) to zeros.
void change_blocks(std::string& bytes, uint64_t count, std::mt19937_64& rng) {
  const uint64_t blocks = (bytes.size() + kBlock - 1) / kBlock;
  for (uint64_t n = 0; n < count; ++n) {
    const uint64_t block = rng() % blocks;
    const bool zero = rng() % 4 == 0;
    for (uint64_t i = block * kBlock; i < std::min<uint64_t>(bytes.size(), (block + 1) * kBlock);
         ++i) {
      bytes[i] = zero ? '\0' : static_cast<char>(rng() | 1);
    }
  }
}

TEST_F(ImageCliTest, PackThenExportIsByteExactWithHolesAndAnOddSize) {
  const std::string raw = image_with_holes(700, 1234, 1);  // not a block multiple
  Outcome packed = pack(0, write_raw("raw", raw), std::nullopt);
  ASSERT_EQ(packed.status, 0) << packed.err;
  EXPECT_NE(packed.out.find("packed rootfs.ext4"), std::string::npos) << packed.out;

  Outcome exported = export_to(0, dir_ / "exported");
  ASSERT_EQ(exported.status, 0) << exported.err;
  EXPECT_TRUE(slurp(dir_ / "exported") == raw);
  // Zero blocks were stored nowhere.
  EXPECT_LT(std::filesystem::file_size(stored(0)), raw.size() * 3 / 4);

  Outcome to_stdout = run_lazyblock(
      dir_, {"export", "--store", store_url_, "--build", build_id(0), "--name", "rootfs.ext4"});
  ASSERT_EQ(to_stdout.status, 0) << to_stdout.err;
  EXPECT_TRUE(to_stdout.out == raw);

  Outcome inspected = run_lazyblock(dir_, {"inspect", "--store", store_url_, "--build", build_id(0),
                                           "--name", "rootfs.ext4", "--json"});
  ASSERT_EQ(inspected.status, 0) << inspected.err;
  const nlohmann::json doc = nlohmann::json::parse(inspected.out);
  EXPECT_EQ(doc.at("size"), raw.size());
  EXPECT_EQ(doc.at("generation"), 0);
  EXPECT_EQ(doc.at("block_size"), kBlock);
  EXPECT_EQ(doc.at("bytes_by_build").at("zeros").get<uint64_t>() +
                doc.at("bytes_by_build").at(build_id(0)).get<uint64_t>(),
            raw.size());
}

TEST_F(ImageCliTest, PackJsonAndInspectShowTheChain) {
  std::string raw = image_with_holes(64, 0, 3);
  Outcome first = pack(0, write_raw("raw0", raw), std::nullopt, {"--json"});
  ASSERT_EQ(first.status, 0) << first.err;
  const nlohmann::json summary = nlohmann::json::parse(first.out);
  EXPECT_EQ(summary.at("build"), build_id(0));
  EXPECT_EQ(summary.at("blocks"), 64);
  EXPECT_EQ(summary.at("changed").get<uint64_t>() + summary.at("zero").get<uint64_t>(), 64u);
  EXPECT_EQ(summary.at("unchanged"), 0);
  EXPECT_EQ(summary.at("data_bytes"), std::filesystem::file_size(stored(0)));
  raw[5 * kBlock] ^= 1;  // one block changed in the child
  Outcome second = pack(1, write_raw("raw1", raw), 0, {"--json"});
  ASSERT_EQ(second.status, 0) << second.err;
  EXPECT_EQ(nlohmann::json::parse(second.out).at("changed"), 1);

  Outcome inspected = run_lazyblock(dir_, {"inspect", "--store", store_url_, "--build", build_id(1),
                                           "--name", "rootfs.ext4", "--json", "--no-mappings"});
  ASSERT_EQ(inspected.status, 0) << inspected.err;
  const nlohmann::json doc = nlohmann::json::parse(inspected.out);
  EXPECT_FALSE(doc.contains("mappings"));
  ASSERT_EQ(doc.at("chain").size(), 2u) << doc.dump();
  EXPECT_EQ(doc.at("chain")[0].at("build_id"), build_id(1));
  EXPECT_EQ(doc.at("chain")[0].at("generation"), 1);
  EXPECT_EQ(doc.at("chain")[1].at("build_id"), build_id(0));
  EXPECT_EQ(doc.at("chain")[1].at("generation"), 0);
  Outcome text = run_lazyblock(dir_, {"inspect", "--store", store_url_, "--build", build_id(1),
                                      "--name", "rootfs.ext4", "--no-mappings"});
  ASSERT_EQ(text.status, 0) << text.err;
  EXPECT_NE(text.out.find(build_id(0) + " generation 0"), std::string::npos) << text.out;
  EXPECT_EQ(text.out.find("mappings (offset"), std::string::npos) << text.out;
}

TEST_F(ImageCliTest, PackFromStdin) {
  const std::string raw = image_with_holes(100, 17, 2);
  std::vector<std::string> args = {"pack",      "--store", store_url_,    "--build",
                                   build_id(0), "--name",  "rootfs.ext4", "-"};
  Outcome packed = run_lazyblock(dir_, args, write_raw("raw", raw));
  ASSERT_EQ(packed.status, 0) << packed.err;
  ASSERT_EQ(export_to(0, dir_ / "exported").status, 0);
  EXPECT_TRUE(slurp(dir_ / "exported") == raw);
}

TEST_F(ImageCliTest, AChainOfFiveGenerationsExportsEachAsPacked) {
  std::mt19937_64 rng(3);
  std::string raw = image_with_holes(1500, 333, 3);
  std::vector<std::string> raws;
  for (int generation = 0; generation < 5; ++generation) {
    if (generation > 0) change_blocks(raw, 40, rng);
    raws.push_back(raw);
    Outcome packed = pack(generation, write_raw("raw" + std::to_string(generation), raw),
                          generation > 0 ? std::optional<int>(generation - 1) : std::nullopt);
    ASSERT_EQ(packed.status, 0) << packed.err;
  }
  for (int generation = 0; generation < 5; ++generation) {
    const std::filesystem::path output = dir_ / ("exported" + std::to_string(generation));
    Outcome exported = export_to(generation, output);
    ASSERT_EQ(exported.status, 0) << exported.err;
    EXPECT_TRUE(slurp(output) == raws[generation]) << "generation " << generation;
  }
  Outcome inspected = run_lazyblock(dir_, {"inspect", "--store", store_url_, "--build", build_id(4),
                                           "--name", "rootfs.ext4", "--json"});
  ASSERT_EQ(inspected.status, 0) << inspected.err;
  const nlohmann::json doc = nlohmann::json::parse(inspected.out);
  EXPECT_EQ(doc.at("generation"), 4);
  EXPECT_EQ(doc.at("base_build_id"), build_id(0));
}

TEST_F(ImageCliTest, EachGenerationStoresLittleMoreThanItsChanges) {
  constexpr uint64_t kBlocks = 2500;  // 10 MiB: three chunks
  std::mt19937_64 rng(4);
  std::string raw(kBlocks * kBlock, '\0');
  for (char& c : raw) c = static_cast<char>(rng() | 1);  // no zero blocks
  ASSERT_EQ(pack(0, write_raw("raw0", raw), std::nullopt).status, 0);
  for (int generation = 1; generation <= 3; ++generation) {
    // 1% of the blocks, each to new non-zero bytes.
    std::vector<uint64_t> blocks(kBlocks);
    for (uint64_t i = 0; i < kBlocks; ++i) blocks[i] = i;
    std::shuffle(blocks.begin(), blocks.end(), rng);
    blocks.resize(kBlocks / 100);
    for (uint64_t block : blocks) {
      for (uint64_t i = block * kBlock; i < (block + 1) * kBlock; ++i) {
        raw[i] = static_cast<char>(raw[i] ^ 0x5a ? raw[i] ^ 0x5a : 1);
      }
    }
    Outcome packed =
        pack(generation, write_raw("raw" + std::to_string(generation), raw), generation - 1);
    ASSERT_EQ(packed.status, 0) << packed.err;
    const uint64_t changed_bytes = blocks.size() * kBlock;
    const uint64_t stored_bytes = std::filesystem::file_size(stored(generation)) +
                                  std::filesystem::file_size(stored(generation, ".header"));
    EXPECT_EQ(std::filesystem::file_size(stored(generation)), changed_bytes);
    EXPECT_LE(stored_bytes, changed_bytes * 11 / 10) << "generation " << generation;
    ASSERT_EQ(export_to(generation, dir_ / "exported").status, 0);
    EXPECT_TRUE(slurp(dir_ / "exported") == raw);
  }
}

// Little-endian bytes of a u64, built here, apart from the code under test.
std::string le64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(value >> (8 * i));
  return bytes;
}

std::string uuid_bytes(const std::string& text) {
  std::string bytes;
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '-') continue;
    bytes.push_back(static_cast<char>(std::stoi(text.substr(i, 2), nullptr, 16)));
    ++i;
  }
  return bytes;
}

TEST_F(ImageCliTest, TheHeaderPackWritesHasTheDocumentedLayout) {
  // Block 0 data, block 1 zeros, blocks 2-3 data (the last one partial).
  std::string raw(3 * kBlock + 100, '\x07');
  std::fill(raw.begin() + kBlock, raw.begin() + 2 * kBlock, '\0');
  ASSERT_EQ(pack(0, write_raw("raw", raw), std::nullopt).status, 0);
  const std::string id = uuid_bytes(build_id(0));
  const std::string nil(16, '\0');
  const std::string expected = le64(3) + le64(kBlock) + le64(raw.size()) + le64(0) + id + id +
                               le64(0) + le64(kBlock) + id + le64(0) +        //
                               le64(kBlock) + le64(kBlock) + nil + le64(0) +  //
                               le64(2 * kBlock) + le64(2 * kBlock) + id + le64(kBlock);
  EXPECT_TRUE(slurp(stored(0, ".header")) == expected);
  EXPECT_EQ(std::filesystem::file_size(stored(0)), 3 * kBlock);
}

TEST_F(ImageCliTest, DamagedHeadersAreClearErrorsNeverCrashes) {
  std::string raw(6 * kBlock, '\x09');
  std::fill(raw.begin() + 2 * kBlock, raw.begin() + 3 * kBlock, '\0');
  ASSERT_EQ(pack(0, write_raw("raw", raw), std::nullopt).status, 0);
  const std::filesystem::path header = stored(0, ".header");
  const std::string good = slurp(header);
  const auto inspect = [&] {
    return run_lazyblock(
        dir_, {"inspect", "--store", store_url_, "--build", build_id(0), "--name", "rootfs.ext4"});
  };
  // `inspect` first loads the header (read, parse, check that it is the
  // build's) and reports a failure of that load as its error; only a header
  // that loads goes on to the rest of the command (the chain of builds, the
  // printing). So every damaged header is loaded here, in process, as
  // `inspect` loads it; the command itself runs on every header that loads,
  // and on one damaged header in each 8-byte field of those that do not.
  // (One process per case, ~370 of them, took 3 minutes under ASan.)
  Result<std::shared_ptr<FileStore>> store = FileStore::open(dir_ / "store");
  ASSERT_TRUE(store) << store.status().to_string();
  const image::Uuid build = *image::Uuid::parse(build_id(0));
  const auto load = [&](const std::string& bytes) {
    std::ofstream(header, std::ios::binary | std::ios::trunc) << bytes;
    return image::load_header(**store, build, "rootfs.ext4", std::chrono::seconds(10));
  };
  // Every cut.
  for (size_t length = 0; length < good.size(); ++length) {
    Result<image::Header> loaded = load(good.substr(0, length));
    ASSERT_FALSE(loaded) << "cut at " << length << " loaded";
    EXPECT_NE(loaded.status().message().find("header"), std::string::npos)
        << "cut at " << length << ": " << loaded.status().to_string();
    if (length % 8 == 0 || length == good.size() - 1) {
      Outcome run = inspect();
      EXPECT_EQ(run.status, 1) << "cut at " << length << ": " << run.err;
      EXPECT_NE(run.err.find("header"), std::string::npos) << run.err;
    }
  }
  // Every byte flipped: an error, or (where the flip still makes a valid
  // header, as in a mapping's build id) success; never a signal.
  int loaded_flips = 0;
  for (size_t at = 0; at < good.size(); ++at) {
    std::string bad = good;
    bad[at] = static_cast<char>(bad[at] ^ 0x41);
    Result<image::Header> loaded = load(bad);
    if (loaded) ++loaded_flips;
    if (!loaded) {
      EXPECT_FALSE(loaded.status().message().empty()) << "flip at " << at;
    }
    if (loaded || at % 8 == 0) {
      Outcome run = inspect();
      EXPECT_TRUE(run.status == 0 || run.status == 1) << "flip at " << at << ": " << run.status;
      EXPECT_EQ(run.status == 0, static_cast<bool>(loaded)) << "flip at " << at << ": " << run.err;
      if (run.status == 1) {
        EXPECT_FALSE(run.err.empty());
      }
    }
  }
  // Some flips load (the base build id, the mappings' build ids), so the
  // command meets them past the load.
  EXPECT_GT(loaded_flips, 0);
  std::string version6 = good;
  version6[0] = 6;
  std::ofstream(header, std::ios::binary | std::ios::trunc) << version6;
  Outcome run = inspect();
  EXPECT_EQ(run.status, 1);
  EXPECT_NE(run.err.find("unsupported header version 6"), std::string::npos) << run.err;
  // Version 3's bytes under version 4's number: not an LZ4-framed block.
  std::string version4 = good;
  version4[0] = 4;
  std::ofstream(header, std::ios::binary | std::ios::trunc) << version4;
  run = inspect();
  EXPECT_EQ(run.status, 1);
  EXPECT_NE(run.err.find("version 4 header: "), std::string::npos) << run.err;
}

TEST_F(ImageCliTest, MistakesAreExplained) {
  // A build that does not exist.
  Outcome missing = export_to(7, dir_ / "out");
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find("object not found"), std::string::npos) << missing.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "out"));
  // A malformed build id.
  Outcome bad_id = run_lazyblock(
      dir_, {"inspect", "--store", store_url_, "--build", "nope", "--name", "rootfs.ext4"});
  EXPECT_EQ(bad_id.status, 2);
  EXPECT_NE(bad_id.err.find("--build"), std::string::npos) << bad_id.err;
  // A parent with other block sizes than asked for; without --block-size,
  // the parent's are taken.
  const std::filesystem::path raw = write_raw("raw", std::string(4 * kMiB, '\x01'));
  ASSERT_EQ(pack(0, raw, std::nullopt, {"--block-size", "2MiB"}).status, 0);
  Outcome mismatch = pack(1, raw, 0, {"--block-size", "4096"});
  EXPECT_NE(mismatch.status, 0);
  EXPECT_NE(mismatch.err.find("2097152"), std::string::npos) << mismatch.err;
  Outcome inherited = pack(3, raw, 0);
  EXPECT_EQ(inherited.status, 0) << inherited.err;
  EXPECT_NE(inherited.out.find("blocks of 2097152 bytes"), std::string::npos) << inherited.out;
  // A missing input file.
  Outcome no_input = pack(2, dir_ / "no-such-file", std::nullopt);
  EXPECT_EQ(no_input.status, 1);
  EXPECT_NE(no_input.err.find("no-such-file"), std::string::npos) << no_input.err;
}

}  // namespace
}  // namespace lazyblock
