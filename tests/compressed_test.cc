// Compressed builds written by an independent implementation of E2B's
// formats (tests/e2b_reference/e2b.py, from E2B's Go code) read back through
// lazyblock: export, serve nbd, and the fetches a cold read makes; and
// builds that `pack --compress` writes, read back by lazyblock and by that
// implementation, and checked byte for byte against hand-built objects.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <lz4frame.h>
#include <openssl/evp.h>
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "chunk/frame_codec.h"
#include "common/unique_fd.h"
#include "common/units.h"
#include "image/device.h"
#include "image/pack.h"
#include "storage/file_store.h"
#include "testing/memory_image.h"
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
    std::vector<std::string> args = {std::string(LAZYBLOCK_E2B_REFERENCE),
                                     "write",
                                     "--store",
                                     (dir_ / "store").string(),
                                     "--build",
                                     build_id(generation),
                                     "--name",
                                     kName,
                                     "--block-size",
                                     block_size,
                                     "--codec",
                                     codec,
                                     "--version",
                                     std::to_string(version),
                                     raw.string()};
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

  // Packs `bytes` with lazyblock as `generation` (over `parent`), with
  // `flags` (--compress, ...); the summary --json printed.
  nlohmann::json pack(int generation, std::optional<int> parent, const std::string& bytes,
                      std::vector<std::string> flags) {
    const std::filesystem::path raw = dir_ / ("image-" + std::to_string(generation));
    std::ofstream(raw, std::ios::binary) << bytes;
    std::vector<std::string> args = {"pack",   "--store", store_,  "--build", build_id(generation),
                                     "--name", kName,     "--json"};
    if (parent) args.insert(args.end(), {"--parent", build_id(*parent)});
    args.insert(args.end(), flags.begin(), flags.end());
    args.push_back(raw.string());
    Outcome packed = run_lazyblock(dir_, args);
    EXPECT_EQ(packed.status, 0) << packed.err;
    return packed.status == 0 ? nlohmann::json::parse(packed.out) : nlohmann::json();
  }

  // The device as the reference implementation reads it (it checks every
  // data file it reads against the size and SHA-256 its header records, and
  // every frame against the frame table); nullopt, with a failure, if it
  // refuses.
  std::optional<std::string> reference_read(int generation) {
    const std::filesystem::path out = dir_ / ("reference-" + std::to_string(generation));
    Outcome read = run_program(
        dir_, "/usr/bin/python3",
        {std::string(LAZYBLOCK_E2B_REFERENCE), "read", "--store", (dir_ / "store").string(),
         "--build", build_id(generation), "--name", kName, "-o", out.string()});
    EXPECT_EQ(read.status, 0) << read.err;
    if (read.status != 0) return std::nullopt;
    return slurp(out);
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  std::string store_;
};

std::string memory_image(uint64_t size, uint64_t seed) {
  const std::vector<std::byte> bytes = testing::make_memory_image(size, seed);
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

// `parent` with about a quarter of its pages replaced by other memory-like
// pages (some of them zeros).
std::string changed_image(const std::string& parent, uint64_t seed) {
  const std::string other = memory_image(parent.size(), seed);
  std::string bytes = parent;
  std::mt19937_64 rng(seed);
  for (uint64_t page = 0; page * 4096 < bytes.size(); ++page) {
    if (rng() % 4 != 0) continue;
    const uint64_t length = std::min<uint64_t>(4096, bytes.size() - page * 4096);
    bytes.replace(page * 4096, length, other, page * 4096, length);
  }
  return bytes;
}

TEST_F(CompressedTest, ChainsMixingVersionsAndCodecsExportByteExact) {
  struct Step {
    std::string codec;
    int version;
  };
  for (const std::string block_size : {"4096", "2MiB"}) {
    // A v3 header cannot map into a compressed build (it has no frame tables),
    // so version 3 comes first, as it does in E2B's buckets.
    const std::vector<Step> chain = {
        {"none", 3}, {"zstd", 4}, {"lz4", 5}, {"none", 4}, {"zstd", 5}};
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
    const uint64_t skip =
        m.build_storage_offset >= 4 * kMiB ? 0 : 4 * kMiB - m.build_storage_offset;
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
  ServerProcess server(dir_,
                       {"serve", "nbd", "--store", store_, "--build", build_id(0), "--name", kName,
                        "--socket", socket.string(), "--read-only"},
                       socket);
  ASSERT_TRUE(server.running()) << slurp(dir_ / "server.log");
  Outcome copied = run_program(
      dir_, "nbdcopy",
      {"nbd+unix:///" + kName + "?socket=" + socket.string(), (dir_ / "copy").string()});
  ASSERT_EQ(copied.status, 0) << copied.err;
  EXPECT_TRUE(slurp(dir_ / "copy") == bytes);
  EXPECT_EQ(server.stop(), 0);
}

TEST_F(CompressedTest, PackCompressRoundTripsThroughExportAndTheReference) {
  struct Case {
    std::string codec;
    int version;
    std::string block_size;
  };
  const std::vector<Case> cases = {
      {"zstd", 4, "4096"},
      {"zstd", 5, "4096"},
      {"lz4", 4, "4096"},
      {"lz4", 5, "4096"},
      // Blocks of 2 MiB over a device whose size is not a multiple of them:
      // the mappings end at its last 4 KiB page.
      {"zstd", 5, "2MiB"}};
  for (size_t i = 0; i < cases.size(); ++i) {
    const Case& c = cases[i];
    SCOPED_TRACE(c.codec + " v" + std::to_string(c.version) + " blocks of " + c.block_size);
    // A device whose last page is partial; its data file spans several frames.
    const std::string bytes = memory_image(5 * kMiB + 1000, 100 + i);
    const int generation = static_cast<int>(i);
    const nlohmann::json summary = pack(generation, std::nullopt, bytes,
                                        {"--compress", c.codec, "--header-version",
                                         std::to_string(c.version), "--block-size", c.block_size});
    ASSERT_FALSE(summary.is_null());
    EXPECT_EQ(summary["header_version"], c.version);
    EXPECT_EQ(summary["codec"], c.codec);
    const uint64_t data_bytes = summary["data_bytes"];
    EXPECT_EQ(summary["frames"], div_round_up(data_bytes, 2 * kMiB));
    EXPECT_LT(summary["stored_bytes"].get<uint64_t>(), data_bytes);
    EXPECT_TRUE(
        std::filesystem::exists(dir_ / "store" / build_id(generation) / (kName + "." + c.codec)));
    EXPECT_TRUE(exported(generation) == bytes);
    EXPECT_TRUE(reference_read(generation) == bytes);
  }
}

TEST_F(CompressedTest, AChainMixingPlainAndCompressedPacksRoundTrips) {
  // A compressed base, a plain child (which must keep version 4 to map into
  // its compressed parent), a grandchild in LZ4 with version 5 headers.
  const std::string base = memory_image(5 * kMiB, 1);
  const std::string child = changed_image(base, 2);
  const std::string grandchild = changed_image(child, 3);
  EXPECT_EQ(pack(0, std::nullopt, base, {"--compress", "zstd", "--level", "1"})["header_version"],
            4);
  const nlohmann::json plain = pack(1, 0, child, {});
  EXPECT_EQ(plain["header_version"], 4);
  EXPECT_EQ(plain["codec"], "none");
  EXPECT_GT(plain["unchanged"].get<uint64_t>(), 0u);
  EXPECT_EQ(pack(2, 1, grandchild, {"--compress", "lz4", "--header-version", "5"})["codec"], "lz4");
  const std::vector<const std::string*> images = {&base, &child, &grandchild};
  for (int g = 0; g < 3; ++g) {
    EXPECT_TRUE(exported(g) == *images[g]) << "generation " << g;
    EXPECT_TRUE(reference_read(g) == *images[g]) << "generation " << g;
  }
  // A version 3 header cannot name a compressed build: refused before
  // anything is stored.
  const std::filesystem::path raw = dir_ / "image-1";
  Outcome v3 =
      run_lazyblock(dir_, {"pack", "--store", store_, "--build", build_id(3), "--parent",
                           build_id(0), "--name", kName, "--header-version", "3", raw.string()});
  EXPECT_EQ(v3.status, 2);
  EXPECT_NE(v3.err.find("version 3 header cannot map into build " + build_id(0)), std::string::npos)
      << v3.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "store" / build_id(3)));
}

TEST_F(CompressedTest, PackRefusesCompressionSettingsItCannotUse) {
  const std::filesystem::path raw = dir_ / "image";
  std::ofstream(raw, std::ios::binary) << memory_image(64 * 1024, 5);
  struct Case {
    std::vector<std::string> flags;
    std::string message;
  };
  const std::vector<Case> cases = {
      {{"--compress", "gzip"}, "--compress gzip: the codecs are zstd and lz4"},
      {{"--compress", "zstd", "--level", "99"}, "zstd compresses at levels"},
      {{"--compress", "lz4", "--level", "13"}, "lz4 compresses at levels 0 to 12, not 13"},
      {{"--level", "3"}, "--level and --frame-size need --compress"},
      {{"--compress", "zstd", "--frame-size", "6KiB"}, "not a multiple of the block size 4096"},
      {{"--compress", "zstd", "--frame-size", "128MiB"}, "at most 64 MiB"},
      {{"--compress", "lz4", "--header-version", "3"}, "a version 3 header cannot describe"},
  };
  for (const Case& c : cases) {
    std::vector<std::string> args = {"pack",      "--store", store_, "--build",
                                     build_id(0), "--name",  kName};
    args.insert(args.end(), c.flags.begin(), c.flags.end());
    args.push_back(raw.string());
    Outcome refused = run_lazyblock(dir_, args);
    EXPECT_EQ(refused.status, 2) << c.message;
    EXPECT_NE(refused.err.find(c.message), std::string::npos) << refused.err;
    EXPECT_FALSE(std::filesystem::exists(dir_ / "store" / build_id(0))) << c.message;
  }
}

// Little-endian field writers for the hand-built header.
void put(std::string& out, uint64_t value, int width) {
  for (int i = 0; i < width; ++i) out.push_back(static_cast<char>(value >> (8 * i)));
}
void put_uuid(std::string& out, const std::string& text) {
  const Result<image::Uuid> id = image::Uuid::parse(text);
  out.append(reinterpret_cast<const char*>(id->bytes.data()), 16);
}

std::string sha256(const std::string& bytes) {
  unsigned char digest[32];
  unsigned int length = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &length, EVP_sha256(), nullptr);
  return std::string(reinterpret_cast<const char*>(digest), 32);
}

// The content of the one LZ4 frame `frame` (the header's inner block).
std::string lz4_content(std::string_view frame, size_t length) {
  LZ4F_dctx* context = nullptr;
  EXPECT_FALSE(LZ4F_isError(LZ4F_createDecompressionContext(&context, LZ4F_VERSION)));
  std::string out(length + 1, '\0');
  size_t out_size = out.size(), in_size = frame.size();
  const size_t left =
      LZ4F_decompress(context, out.data(), &out_size, frame.data(), &in_size, nullptr);
  LZ4F_freeDecompressionContext(context);
  EXPECT_EQ(left, 0u) << "the frame does not end where the object does";
  EXPECT_EQ(in_size, frame.size());
  out.resize(out_size);
  return out;
}

TEST_F(CompressedTest, PackWritesTheBytesOfAHandBuiltBuild) {
  // Six blocks: A B (zeros) C D E. With frames of two blocks the data file
  // (A B C D E, 20 KiB) is three frames: AB, CD, E.
  std::string blocks[5];
  for (int i = 0; i < 5; ++i) {
    blocks[i] = std::string(4096, static_cast<char>('A' + i));
    std::memcpy(blocks[i].data(), "block ", 6);
  }
  const std::string image =
      blocks[0] + blocks[1] + std::string(4096, '\0') + blocks[2] + blocks[3] + blocks[4];
  const std::string data = blocks[0] + blocks[1] + blocks[2] + blocks[3] + blocks[4];
  const std::filesystem::path raw = dir_ / "image";
  std::ofstream(raw, std::ios::binary) << image;
  Result<std::shared_ptr<FileStore>> store = FileStore::open(dir_ / "store");
  ASSERT_TRUE(store);
  for (const auto& [codec, frame_codec] : {std::pair{image::Codec::kZstd, FrameCodec::kZstd},
                                           std::pair{image::Codec::kLz4, FrameCodec::kLz4}}) {
    SCOPED_TRACE(std::string(image::codec_name(codec)));
    const std::string build = build_id(static_cast<int>(codec));
    image::PackOptions options;
    options.build = *image::Uuid::parse(build);
    options.name = kName;
    options.codec = codec;
    options.frame_size = 8192;
    options.encoder_threads = 3;
    UniqueFd raw_file(::open(raw.c_str(), O_RDONLY | O_CLOEXEC));
    const int fd = raw_file.get();
    ASSERT_GE(fd, 0);
    Result<image::PackSummary> packed =
        image::pack(std::make_shared<image::DataFiles>(*store, ChunkerOptions{}), fd, options, {});
    raw_file.reset();
    ASSERT_TRUE(packed) << packed.status().to_string();

    // The data object: each frame compressed on its own, one after another.
    const int level = default_level(frame_codec);
    std::string stored;
    std::vector<std::pair<uint64_t, uint64_t>> frames;  // (start_c, size_c)
    for (size_t at = 0; at < data.size(); at += 8192) {
      Result<std::vector<std::byte>> frame = compress_frame(
          frame_codec, level,
          std::as_bytes(std::span(data.data() + at, std::min<size_t>(8192, data.size() - at))));
      ASSERT_TRUE(frame);
      frames.emplace_back(stored.size(), frame->size());
      stored.append(reinterpret_cast<const char*>(frame->data()), frame->size());
    }
    const std::string suffix = codec == image::Codec::kZstd ? ".zstd" : ".lz4";
    EXPECT_TRUE(slurp(dir_ / "store" / build / (kName + suffix)) == stored);

    // The header: metadata, flags, the inner block's length, and the inner
    // block (LZ4 may choose other matches, so its content is compared).
    std::string meta;
    for (uint64_t field : {uint64_t{4}, uint64_t{4096}, uint64_t{image.size()}, uint64_t{0}}) {
      put(meta, field, 8);
    }
    put_uuid(meta, build);
    put_uuid(meta, build);
    std::string inner;
    put(inner, 1, 4);  // one build: its own
    put_uuid(inner, build);
    put(inner, data.size(), 8);
    inner += sha256(data);
    put(inner, static_cast<uint32_t>(codec), 4);
    put(inner, frames.size(), 4);
    for (size_t i = 0; i < frames.size(); ++i) {
      put(inner, i * 8192, 8);
      put(inner, frames[i].first, 8);
      put(inner, std::min<uint64_t>(8192, data.size() - i * 8192), 4);
      put(inner, frames[i].second, 4);
    }
    put(inner, 3, 4);  // mappings: A B | zeros | C D E
    for (const auto& [offset, length, mapped, storage] :
         {std::tuple{0, 8192, true, 0}, std::tuple{8192, 4096, false, 0},
          std::tuple{12288, 12288, true, 8192}}) {
      put(inner, offset, 8);
      put(inner, length, 8);
      if (mapped) {
        put_uuid(inner, build);
      } else {
        inner.append(16, '\0');
      }
      put(inner, storage, 8);
    }
    const std::string header = slurp(dir_ / "store" / build / (kName + ".header"));
    ASSERT_GT(header.size(), 69u);
    EXPECT_TRUE(header.substr(0, 64) == meta);
    EXPECT_EQ(header[64], '\0') << "flags: a finished upload";
    std::string length;
    put(length, inner.size(), 4);
    EXPECT_TRUE(header.substr(65, 4) == length);
    EXPECT_TRUE(lz4_content(std::string_view(header).substr(69), inner.size()) == inner);
  }
}

TEST_F(CompressedTest, InspectShowsCodecsAndVerifyNamesTheFirstBadFrame) {
  const std::string base = memory_image(5 * kMiB, 11);
  pack(0, std::nullopt, base, {"--compress", "zstd"});
  pack(1, 0, changed_image(base, 12), {});
  const std::vector<std::string> inspect = {"inspect",   "--store", store_, "--build",
                                            build_id(1), "--name",  kName,  "--no-mappings"};
  std::vector<std::string> as_json = inspect;
  as_json.insert(as_json.end(), {"--json", "--verify"});
  Outcome listed = run_lazyblock(dir_, as_json);
  ASSERT_EQ(listed.status, 0) << listed.err;
  const nlohmann::json doc = nlohmann::json::parse(listed.out);
  EXPECT_EQ(doc["version"], 4);
  ASSERT_EQ(doc["chain"].size(), 2u);
  const nlohmann::json& child = doc["chain"][0];
  const nlohmann::json& parent = doc["chain"][1];
  EXPECT_EQ(child["codec"], "none");
  EXPECT_TRUE(child["verified"]["sha256_checked"].get<bool>());
  EXPECT_EQ(parent["codec"], "zstd");
  const uint64_t frames = parent["frames"];
  EXPECT_GE(frames, 2u);
  EXPECT_EQ(parent["verified"]["frames"], frames);
  EXPECT_EQ(parent["verified"]["size"], parent["size"]);
  EXPECT_TRUE(parent["verified"]["sha256_checked"].get<bool>());
  EXPECT_GT(parent["ratio"].get<double>(), 1.5);

  const std::string header_bytes = slurp(dir_ / "store" / build_id(0) / (kName + ".header"));
  Result<image::Header> header = image::Header::parse(std::as_bytes(std::span(header_bytes)));
  ASSERT_TRUE(header);
  const std::vector<image::Frame>& table = header->builds.at(0).frame_table.frames;
  const std::filesystem::path data = dir_ / "store" / build_id(0) / (kName + ".zstd");
  const std::string good = slurp(data);
  std::vector<std::string> verify = inspect;
  verify.push_back("--verify");
  // One byte changed in the middle of frame 1.
  std::string bad = good;
  bad[table[1].start_c + table[1].size_c / 2] ^= 0x5a;
  std::ofstream(data, std::ios::binary | std::ios::trunc) << bad;
  Outcome corrupt = run_lazyblock(dir_, verify);
  EXPECT_EQ(corrupt.status, 1);
  EXPECT_NE(corrupt.err.find(build_id(0) + "/" + kName + ".zstd: frame 1 of " +
                             std::to_string(table.size())),
            std::string::npos)
      << corrupt.err;
  // Cut in the middle of the last frame.
  std::ofstream(data, std::ios::binary | std::ios::trunc)
      << good.substr(0, table.back().start_c + table.back().size_c / 2);
  Outcome truncated = run_lazyblock(dir_, verify);
  EXPECT_EQ(truncated.status, 1);
  EXPECT_NE(truncated.err.find("frame " + std::to_string(table.size() - 1) + " of " +
                               std::to_string(table.size())),
            std::string::npos)
      << truncated.err;
  EXPECT_NE(truncated.err.find("cut short"), std::string::npos) << truncated.err;
  // A plain data file that lost a byte's worth of bits: its SHA-256 says so.
  std::ofstream(data, std::ios::binary | std::ios::trunc) << good;
  const std::filesystem::path plain = dir_ / "store" / build_id(1) / kName;
  std::string changed = slurp(plain);
  changed[changed.size() / 2] ^= 1;
  std::ofstream(plain, std::ios::binary | std::ios::trunc) << changed;
  Outcome flipped = run_lazyblock(dir_, verify);
  EXPECT_EQ(flipped.status, 1);
  EXPECT_NE(flipped.err.find(build_id(1) + "/" + kName + ": its "), std::string::npos)
      << flipped.err;
  EXPECT_NE(flipped.err.find("SHA-256"), std::string::npos) << flipped.err;
}

// The paths under `dir` whose names contain `part`.
std::vector<std::filesystem::path> files_named(const std::filesystem::path& dir,
                                               const std::string& part) {
  std::vector<std::filesystem::path> found;
  for (const auto& entry : std::filesystem::recursive_directory_iterator(dir)) {
    if (entry.path().filename().string().find(part) != std::string::npos) {
      found.push_back(entry.path());
    }
  }
  return found;
}

// pack --compress killed with SIGKILL at moments spread over a whole pack's
// time (mostly while frames are encoded, sometimes while the data file or
// the header goes up): a reader never meets a header whose data is not
// whole, the next pack of the same build id either succeeds byte-exact or
// (its header there) refuses saying so, and no temporary file of the killed
// one is left in the store after it (the file store removes a dead
// process's on its next put of the same key).
TEST_F(CompressedTest, APackKilledMidwayLeavesNoHalfBuildAndTheNextPackIsByteExact) {
  const std::string bytes = memory_image(8 * kMiB, 31);
  const std::filesystem::path raw = dir_ / "image-killed";
  std::ofstream(raw, std::ios::binary) << bytes;
  const std::string build = build_id(1);
  const std::vector<std::string> args = {"pack", "--store",    store_, "--build",   build, "--name",
                                         kName,  "--compress", "zstd", raw.string()};
  const std::filesystem::path header = dir_ / "store" / build / (kName + ".header");
  const auto exported_bytes = [&](Outcome* run) {
    const std::filesystem::path out = dir_ / "out-killed";
    std::filesystem::remove(out);
    *run = run_lazyblock(
        dir_, {"export", "--store", store_, "--build", build, "--name", kName, "-o", out.string()});
    return slurp(out);
  };
  // A whole pack's time here, to kill the others within it.
  const auto begin = std::chrono::steady_clock::now();
  Outcome whole = run_lazyblock(dir_, args);
  const auto took = std::chrono::steady_clock::now() - begin;
  ASSERT_EQ(whole.status, 0) << whole.err;

  constexpr int kKills = 3;
  std::mt19937_64 rng(16);
  int refused = 0;
  for (int kill = 0; kill < kKills; ++kill) {
    std::filesystem::remove_all(dir_ / "store" / build);
    // The moment to kill at: somewhere in the kill-th third of a pack.
    const auto at =
        took * kill / kKills + std::chrono::duration_cast<std::chrono::nanoseconds>(took / kKills) *
                                   std::uniform_real_distribution<double>(0, 1)(rng);
    Result<testing::ChildProcess> killed = start_lazyblock(args);
    ASSERT_TRUE(killed) << killed.status().to_string();
    const pid_t pid = killed->pid();
    std::this_thread::sleep_for(at);  // the fault's moment, not a wait for anything
    killed->kill_hard();
    SCOPED_TRACE("killed after " + std::to_string(std::chrono::duration<double>(at).count()) +
                 " s of a " + std::to_string(std::chrono::duration<double>(took).count()) +
                 " s pack");

    const bool visible = std::filesystem::exists(header);
    Outcome read;
    const std::string got = exported_bytes(&read);
    if (visible) {
      ASSERT_EQ(read.status, 0) << "a header without its whole data: " << read.err;
      EXPECT_TRUE(got == bytes) << "the build a killed pack left differs from its image";
    } else {
      EXPECT_NE(read.status, 0) << "a build without a header was read";
    }

    if (!visible && files_named(dir_ / "store", ".tmp-").empty()) {
      // What a kill while the data file went up leaves, if this one did not.
      std::filesystem::create_directories(dir_ / "store" / build);
      std::ofstream(dir_ / "store" / build / fmt::format("{}.zstd.tmp-{}-0", kName, pid))
          << bytes.substr(0, 4096);
    }
    Outcome again = run_lazyblock(dir_, args);
    if (visible) {
      ++refused;
      EXPECT_NE(again.status, 0);
      EXPECT_NE(again.err.find("already has"), std::string::npos) << again.err;
    } else {
      ASSERT_EQ(again.status, 0) << again.err;
      EXPECT_TRUE(exported_bytes(&read) == bytes) << read.err;
    }
    EXPECT_TRUE(files_named(dir_ / "store", ".tmp-").empty())
        << "a temporary file is left in the store: "
        << files_named(dir_ / "store", ".tmp-").front();
  }
  // Mostly killed before its header went up (else nothing was tested).
  EXPECT_LT(refused, kKills);
}

}  // namespace
}  // namespace lazyblock
