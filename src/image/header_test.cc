#include "image/header.h"

#include <lz4frame.h>
#include <unistd.h>

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <tuple>

#include "testing/child_process.h"
#include "testing/scratch_dir.h"

namespace lazyblock::image {

// Readable failures for the types under test.
void PrintTo(const Mapping& m, std::ostream* os) {
  *os << "{" << m.offset << ", +" << m.length << ", " << m.build_id.to_string() << " @ "
      << m.build_storage_offset << "}";
}
void PrintTo(const Header& h, std::ostream* os) {
  *os << "{version " << h.version << ", block " << h.block_size << ", size " << h.size
      << ", generation " << h.generation << ", build " << h.build_id.to_string() << ", base "
      << h.base_build_id.to_string() << ", mappings:";
  for (const Mapping& m : h.mappings) {
    *os << " {" << m.offset << ", +" << m.length << ", " << m.build_id.to_string() << " @ "
        << m.build_storage_offset << "}";
  }
  *os << ", builds:";
  for (const BuildInfo& b : h.builds) {
    *os << " {" << b.build_id.to_string() << " size " << b.size << " "
        << codec_name(b.frame_table.codec) << " frames";
    for (const Frame& f : b.frame_table.frames) {
      *os << " [" << f.start_u << "+" << f.size_u << " @" << f.start_c << "+" << f.size_c << "]";
    }
    *os << "}";
  }
  *os << "}";
}
void PrintTo(const Frame& f, std::ostream* os) {
  *os << "{u " << f.start_u << " +" << f.size_u << ", c " << f.start_c << " +" << f.size_c << "}";
}

namespace {

Uuid id(uint8_t fill) {
  Uuid u;
  u.bytes.fill(fill);
  return u;
}

// A device of 10 blocks and 100 bytes: own data, zeros, a parent's data.
Header sample() {
  Header h;
  h.block_size = 4096;
  h.size = 10 * 4096 + 100;
  h.generation = 2;
  h.build_id = id(0xaa);
  h.base_build_id = id(0xbb);
  h.mappings = {{0, 3 * 4096, id(0xaa), 0},
                {3 * 4096, 2 * 4096, Uuid::nil(), 0},
                {5 * 4096, 6 * 4096, id(0xbb), 8 * 4096}};
  return h;
}

// Little-endian bytes built here, apart from the code under test.
void le64(std::vector<std::byte>& out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(std::byte(static_cast<uint8_t>(value >> (8 * i))));
}
void raw_id(std::vector<std::byte>& out, uint8_t fill) {
  for (int i = 0; i < 16; ++i) out.push_back(std::byte(fill));
}

std::vector<std::byte> sample_bytes() {
  std::vector<std::byte> out;
  le64(out, 3);
  le64(out, 4096);
  le64(out, 10 * 4096 + 100);
  le64(out, 2);
  raw_id(out, 0xaa);
  raw_id(out, 0xbb);
  le64(out, 0), le64(out, 3 * 4096), raw_id(out, 0xaa), le64(out, 0);
  le64(out, 3 * 4096), le64(out, 2 * 4096), raw_id(out, 0), le64(out, 0);
  le64(out, 5 * 4096), le64(out, 6 * 4096), raw_id(out, 0xbb), le64(out, 8 * 4096);
  return out;
}

TEST(HeaderTest, WritesTheDocumentedBytesAndReadsThemBack) {
  Result<std::vector<std::byte>> bytes = sample().serialize();
  ASSERT_TRUE(bytes) << bytes.status().to_string();
  EXPECT_EQ(*bytes, sample_bytes());
  Result<Header> parsed = Header::parse(sample_bytes());
  ASSERT_TRUE(parsed) << parsed.status().to_string();
  EXPECT_EQ(parsed->size, sample().size);
  EXPECT_EQ(parsed->generation, 2u);
  EXPECT_EQ(parsed->build_id, id(0xaa));
  EXPECT_EQ(parsed->base_build_id, id(0xbb));
  EXPECT_EQ(parsed->mappings, sample().mappings);
}

TEST(HeaderTest, AnEmptyDeviceHasNoMappings) {
  Header h;
  h.build_id = h.base_build_id = id(1);
  Result<std::vector<std::byte>> bytes = h.serialize();
  ASSERT_TRUE(bytes);
  EXPECT_EQ(bytes->size(), kMetadataBytes);
  EXPECT_TRUE(Header::parse(*bytes));
}

// The message of parse() on sample() changed by `change`.
std::string rejection(void (*change)(Header&)) {
  Header h = sample();
  change(h);
  std::vector<std::byte> bytes;
  le64(bytes, h.version);
  le64(bytes, h.block_size);
  le64(bytes, h.size);
  le64(bytes, h.generation);
  raw_id(bytes, 0xaa);
  raw_id(bytes, 0xbb);
  for (const Mapping& m : h.mappings) {
    le64(bytes, m.offset), le64(bytes, m.length);
    for (uint8_t b : m.build_id.bytes) bytes.push_back(std::byte(b));
    le64(bytes, m.build_storage_offset);
  }
  Result<Header> parsed = Header::parse(bytes);
  EXPECT_FALSE(h.serialize()) << "serialize accepted what parse should refuse";
  if (parsed) return "accepted";
  EXPECT_EQ(parsed.status().code(), StatusCode::kCorruption);
  return parsed.status().message();
}

TEST(HeaderTest, RefusesWhatBreaksTheRules) {
  EXPECT_EQ(rejection([](Header& h) { h.version = 2; }), "unsupported header version 2");
  EXPECT_EQ(rejection([](Header& h) { h.version = 6; }), "unsupported header version 6");
  EXPECT_NE(rejection([](Header& h) { h.block_size = 0; }).find("block size 0"), std::string::npos);
  EXPECT_NE(rejection([](Header& h) { h.block_size = 3000; }).find("power of two"),
            std::string::npos);
  EXPECT_EQ(rejection([](Header& h) { h.mappings[1].offset += 4096; }),
            "mapping 1 starts at 16384, expected 12288");
  EXPECT_EQ(rejection([](Header& h) { std::swap(h.mappings[0], h.mappings[1]); }),
            "mapping 0 starts at 12288, expected 0");
  EXPECT_NE(rejection([](Header& h) { h.mappings[2].length += 4096; }).find("past the device"),
            std::string::npos);
  EXPECT_NE(rejection([](Header& h) { h.mappings[2].length -= 4096; }).find("cover"),
            std::string::npos);
  EXPECT_NE(rejection([](Header& h) { h.mappings[0].length = 100; }).find("whole blocks"),
            std::string::npos);
  EXPECT_NE(
      rejection([](Header& h) { h.mappings[2].build_storage_offset = 7; }).find("whole blocks"),
      std::string::npos);
  EXPECT_NE(rejection([](Header& h) {
              h.mappings[2].build_storage_offset = UINT64_MAX - 4095;
            }).find("overflows"),
            std::string::npos);
  EXPECT_NE(rejection([](Header& h) { h.size = UINT64_MAX; }).find("too large"), std::string::npos);
  EXPECT_NE(rejection([](Header& h) {
              h.mappings.insert(h.mappings.begin() + 1, Mapping{3 * 4096, 0, id(1), 0});
            }).find("empty"),
            std::string::npos);
  EXPECT_NE(rejection([](Header& h) { h.size = 0; }).find("mappings for a device of 0 blocks"),
            std::string::npos);
}

TEST(HeaderTest, EveryTruncationIsRefused) {
  const std::vector<std::byte> good = sample_bytes();
  for (size_t length = 0; length < good.size(); ++length) {
    Result<Header> parsed = Header::parse(std::span(good).first(length));
    EXPECT_FALSE(parsed) << "accepted a header cut at " << length;
  }
}

TEST(HeaderTest, EveryFlippedByteParsesCleanlyOrIsRefused) {
  const std::vector<std::byte> good = sample_bytes();
  for (size_t at = 0; at < good.size(); ++at) {
    for (uint8_t flip : {0x01, 0x80, 0xff}) {
      std::vector<std::byte> bad = good;
      bad[at] ^= std::byte(flip);
      Result<Header> parsed = Header::parse(bad);
      if (parsed) {
        // Whatever parses must be valid and write back to the same bytes.
        EXPECT_TRUE(parsed->validate().is_ok());
        EXPECT_EQ(*parsed->serialize(), bad);
      }
    }
  }
}

TEST(HeaderTest, MappingAtFindsTheHoldingMapping) {
  const Header h = sample();
  EXPECT_EQ(h.mapping_at(0), 0u);
  EXPECT_EQ(h.mapping_at(3 * 4096 - 1), 0u);
  EXPECT_EQ(h.mapping_at(3 * 4096), 1u);
  EXPECT_EQ(h.mapping_at(h.size - 1), 2u);
}

TEST(HeaderTest, UuidsPrintAndParse) {
  const Uuid u = Uuid::random();
  EXPECT_EQ(*Uuid::parse(u.to_string()), u);
  EXPECT_EQ(u.bytes[6] >> 4, 4);
  EXPECT_EQ(Uuid::parse("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0")->to_string(),
            "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0");
  for (const char* bad :
       {"", "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg",
        "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0-", "0f1e2d3c+4b5a-6978-8796-a5b4c3d2e1f0"}) {
    EXPECT_FALSE(Uuid::parse(bad)) << bad;
  }
  EXPECT_TRUE(Uuid::nil().is_nil());
  EXPECT_FALSE(u.is_nil());
}

// Reads the build and storage offset of every block through `mappings`.
std::vector<std::pair<Uuid, uint64_t>> blocks_of(const std::vector<Mapping>& mappings) {
  std::vector<std::pair<Uuid, uint64_t>> blocks;
  for (const Mapping& m : mappings) {
    for (uint64_t b = 0; b < m.length / 4096; ++b) {
      blocks.emplace_back(m.build_id, m.build_id.is_nil() ? 0 : m.build_storage_offset + b * 4096);
    }
  }
  return blocks;
}

TEST(MergeMappingsTest, ChangesLaidOverAParentMatchABlockByBlockModel) {
  std::mt19937_64 rng(11);
  for (int round = 0; round < 200; ++round) {
    const uint64_t blocks = 1 + rng() % 40;
    // A parent of random runs from two builds and zeros.
    Header parent;
    parent.size = blocks * 4096;
    parent.build_id = parent.base_build_id = id(1);
    for (uint64_t b = 0; b < blocks;) {
      const uint64_t run = std::min<uint64_t>(blocks - b, 1 + rng() % 5);
      const int kind = static_cast<int>(rng() % 3);
      parent.mappings.push_back({b * 4096, run * 4096, kind == 0 ? Uuid::nil() : id(kind),
                                 kind == 0 ? 0 : (rng() % 100) * 4096});
      b += run;
    }
    // Random changed runs into the child's file, or to zeros.
    std::vector<Mapping> changed;
    uint64_t stored = 0;
    for (uint64_t b = 0; b < blocks;) {
      const uint64_t run = std::min<uint64_t>(blocks - b, 1 + rng() % 4);
      if (rng() % 2 == 0) {
        const bool zero = rng() % 3 == 0;
        changed.push_back({b * 4096, run * 4096, zero ? Uuid::nil() : id(9), zero ? 0 : stored});
        if (!zero) stored += run * 4096;
      }
      b += run + rng() % 3;
    }
    std::vector<std::pair<Uuid, uint64_t>> expected = blocks_of(parent.mappings);
    for (const auto& [b, source] : [&] {
           std::vector<std::pair<uint64_t, std::pair<Uuid, uint64_t>>> overrides;
           for (const Mapping& m : changed) {
             for (uint64_t i = 0; i < m.length / 4096; ++i) {
               overrides.push_back(
                   {m.offset / 4096 + i,
                    {m.build_id, m.build_id.is_nil() ? 0 : m.build_storage_offset + i * 4096}});
             }
           }
           return overrides;
         }()) {
      expected[b] = source;
    }
    const std::vector<Mapping> merged = merge_mappings(parent.mappings, changed);
    EXPECT_EQ(blocks_of(merged), expected) << "round " << round;
    Header child = parent;
    child.mappings = merged;
    EXPECT_TRUE(child.validate().is_ok()) << child.validate().to_string();
    // Joined only where one range in one file: no two neighbours could join.
    for (size_t i = 1; i < merged.size(); ++i) {
      const Mapping& a = merged[i - 1];
      const Mapping& b = merged[i];
      EXPECT_FALSE(
          a.build_id == b.build_id &&
          (a.build_id.is_nil() || a.build_storage_offset + a.length == b.build_storage_offset))
          << "round " << round << ": mappings " << i - 1 << " and " << i << " should be one";
    }
  }
}

TEST(MergeMappingsTest, NeighboursInOneFileJoinOthersDoNot) {
  const std::vector<Mapping> parent = {{0, 4 * 4096, id(1), 0}};
  // The change continues the parent's file contiguously: one mapping.
  EXPECT_EQ(merge_mappings(parent, {{2 * 4096, 2 * 4096, id(1), 2 * 4096}}),
            (std::vector<Mapping>{{0, 4 * 4096, id(1), 0}}));
  // Same build, storage not contiguous: two.
  EXPECT_EQ(merge_mappings(parent, {{2 * 4096, 2 * 4096, id(1), 9 * 4096}}),
            (std::vector<Mapping>{{0, 2 * 4096, id(1), 0}, {2 * 4096, 2 * 4096, id(1), 9 * 4096}}));
}

// ---------------------------------------------------------------------------
// Versions 4 and 5.

constexpr uint64_t kPage = 4096;

// Little-endian fields of any width, built here apart from the code under test.
void le(std::vector<std::byte>& out, uint64_t value, int width) {
  for (int i = 0; i < width; ++i) out.push_back(std::byte(static_cast<uint8_t>(value >> (8 * i))));
}
void raw(std::vector<std::byte>& out, std::initializer_list<uint8_t> bytes) {
  for (uint8_t b : bytes) out.push_back(std::byte(b));
}
void raw_uuid(std::vector<std::byte>& out, const Uuid& u) {
  for (uint8_t b : u.bytes) out.push_back(std::byte(b));
}
std::array<uint8_t, 32> sha(uint8_t fill) {
  std::array<uint8_t, 32> digest;
  for (size_t i = 0; i < digest.size(); ++i) digest[i] = static_cast<uint8_t>(fill + i);
  return digest;
}

// Four builds: A, this build, zstd; B lz4, with a frame no mapping reaches; C
// uncompressed with an entry; D without an entry. The mappings name them in
// the order D, B, A, C (not their sorted order), with a long zero range.
const Uuid kA = id(0xa1), kB = id(0xb2), kC = id(0xc3), kD = id(0xd4);

Header sample45(uint64_t version) {
  Header h;
  h.version = version;
  h.block_size = 4096;
  h.size = 167 * kPage - 100;
  h.generation = 3;
  h.build_id = kA;
  h.base_build_id = kC;
  h.mappings = {{0, 2 * kPage, kD, 300 * kPage},
                {2 * kPage, 157 * kPage, Uuid::nil(), 0},
                {159 * kPage, 3 * kPage, kB, 2 * kPage},
                {162 * kPage, 3 * kPage, kA, 0},
                {165 * kPage, kPage, kC, 0},
                {166 * kPage, kPage, kA, 3 * kPage}};
  h.builds = {
      {kA,
       4 * kPage,
       sha(1),
       {Codec::kZstd, {{0, 0, 2 * kPage, 1000}, {2 * kPage, 1000, 2 * kPage, 900}}}},
      {kB,
       6 * kPage,
       sha(2),
       {Codec::kLz4,
        {{0, 0, 2 * kPage, 500},
         {2 * kPage, 500, 2 * kPage, 700},
         {4 * kPage, 1200, 2 * kPage, 800}}}},
      {kC, kPage, sha(3), {}},
  };
  return h;
}

// sample45() as written: B's first frame, which no mapping reaches, left out.
Header trimmed45(uint64_t version) {
  Header h = sample45(version);
  h.builds[1].frame_table.frames.erase(h.builds[1].frame_table.frames.begin());
  return h;
}

std::vector<std::byte> metadata_bytes(const Header& h) {
  std::vector<std::byte> out;
  le(out, h.version, 8);
  le(out, h.block_size, 8);
  le(out, h.size, 8);
  le(out, h.generation, 8);
  raw_uuid(out, h.build_id);
  raw_uuid(out, h.base_build_id);
  return out;
}

std::vector<std::byte> builds_section_bytes() {
  std::vector<std::byte> out;
  le(out, 3, 4);
  raw_uuid(out, kA);
  le(out, 4 * kPage, 8);
  for (uint8_t b : sha(1)) out.push_back(std::byte(b));
  le(out, 1, 4), le(out, 2, 4);  // zstd, 2 frames
  le(out, 0, 8), le(out, 0, 8), le(out, 2 * kPage, 4), le(out, 1000, 4);
  le(out, 2 * kPage, 8), le(out, 1000, 8), le(out, 2 * kPage, 4), le(out, 900, 4);
  raw_uuid(out, kB);
  le(out, 6 * kPage, 8);
  for (uint8_t b : sha(2)) out.push_back(std::byte(b));
  le(out, 2, 4), le(out, 2, 4);  // lz4, the 2 frames the mapping reaches
  le(out, 2 * kPage, 8), le(out, 500, 8), le(out, 2 * kPage, 4), le(out, 700, 4);
  le(out, 4 * kPage, 8), le(out, 1200, 8), le(out, 2 * kPage, 4), le(out, 800, 4);
  raw_uuid(out, kC);
  le(out, kPage, 8);
  for (uint8_t b : sha(3)) out.push_back(std::byte(b));
  le(out, 0, 4), le(out, 0, 4);  // uncompressed
  return out;
}

// The v5 mapping section of sample45(), column by column, varints by hand.
struct V5Columns {
  std::vector<Uuid> table = {kD, kB, kA, kC};
  uint32_t count = 5;
  std::vector<uint8_t> offsets = {0x00, 0x9f, 0x01, 0x03, 0x03, 0x01};  // 0, +159, +3, +3, +1
  std::vector<uint8_t> lengths = {0x02, 0x03, 0x03, 0x01, 0x01};
  // 300, 2, 0, 0, 3 pages: +300, -298, -2, 0, +3 zigzagged to 600, 595, 3, 0, 6.
  std::vector<uint8_t> storage = {0xd8, 0x04, 0xd3, 0x04, 0x03, 0x00, 0x06};
  std::vector<uint8_t> builds = {0, 1, 2, 3, 2};

  std::vector<std::byte> bytes() const {
    std::vector<std::byte> out;
    le(out, table.size(), 4);
    for (const Uuid& u : table) raw_uuid(out, u);
    le(out, count, 4);
    for (const auto* column : {&offsets, &lengths, &storage, &builds}) {
      for (uint8_t b : *column) out.push_back(std::byte(b));
    }
    return out;
  }
};

std::vector<std::byte> v4_mapping_bytes(const std::vector<Mapping>& mappings) {
  std::vector<std::byte> out;
  le(out, mappings.size(), 4);
  for (const Mapping& m : mappings) {
    le(out, m.offset, 8), le(out, m.length, 8), raw_uuid(out, m.build_id);
    le(out, m.build_storage_offset, 8);
  }
  return out;
}

std::vector<std::byte> expected_inner(uint64_t version) {
  std::vector<std::byte> inner = builds_section_bytes();
  const std::vector<std::byte> mappings =
      version == 4 ? v4_mapping_bytes(sample45(4).mappings) : V5Columns{}.bytes();
  inner.insert(inner.end(), mappings.begin(), mappings.end());
  return inner;
}

// An LZ4 frame made apart from the serializer: liblz4's one-shot call, which
// picks its own block size and records the content size.
std::vector<std::byte> lz4_one_shot(const std::vector<std::byte>& content, bool checksum = true) {
  LZ4F_preferences_t prefs{};
  prefs.frameInfo.contentChecksumFlag =
      checksum ? LZ4F_contentChecksumEnabled : LZ4F_noContentChecksum;
  prefs.frameInfo.contentSize = content.size();
  std::vector<std::byte> frame(LZ4F_compressFrameBound(content.size(), &prefs));
  const size_t n =
      LZ4F_compressFrame(frame.data(), frame.size(), content.data(), content.size(), &prefs);
  EXPECT_FALSE(LZ4F_isError(n));
  frame.resize(n);
  return frame;
}

std::vector<std::byte> lz4_content(std::span<const std::byte> frame) {
  LZ4F_dctx* ctx = nullptr;
  EXPECT_FALSE(LZ4F_isError(LZ4F_createDecompressionContext(&ctx, LZ4F_VERSION)));
  std::vector<std::byte> out(1 << 20);
  size_t produced = out.size();
  size_t taken = frame.size();
  const size_t rest = LZ4F_decompress(ctx, out.data(), &produced, frame.data(), &taken, nullptr);
  LZ4F_freeDecompressionContext(ctx);
  EXPECT_EQ(rest, 0u) << "not one whole LZ4 frame";
  EXPECT_EQ(taken, frame.size());
  out.resize(produced);
  return out;
}

// A whole v4/v5 header object around an inner block: metadata, flags, length, frame.
std::vector<std::byte> header_object(const Header& metadata_from,
                                     const std::vector<std::byte>& inner, uint8_t flags = 0,
                                     std::optional<uint32_t> length = {}) {
  std::vector<std::byte> out = metadata_bytes(metadata_from);
  out.push_back(std::byte(flags));
  le(out, length.value_or(static_cast<uint32_t>(inner.size())), 4);
  const std::vector<std::byte> frame = lz4_one_shot(inner);
  out.insert(out.end(), frame.begin(), frame.end());
  return out;
}

std::string parse_error(const std::vector<std::byte>& bytes) {
  Result<Header> parsed = Header::parse(bytes);
  if (parsed) return "accepted";
  EXPECT_EQ(parsed.status().code(), StatusCode::kCorruption);
  return parsed.status().message();
}

#define EXPECT_HAS(text, part) EXPECT_NE(std::string(text).find(part), std::string::npos) << (text)

TEST(HeaderV4V5Test, WritesTheDocumentedBytes) {
  for (uint64_t version : {4, 5}) {
    SCOPED_TRACE(version);
    Result<std::vector<std::byte>> bytes = sample45(version).serialize();
    ASSERT_TRUE(bytes) << bytes.status().to_string();
    const std::vector<std::byte> metadata = metadata_bytes(sample45(version));
    ASSERT_GT(bytes->size(), 69u);
    EXPECT_TRUE(std::equal(metadata.begin(), metadata.end(), bytes->begin()));
    EXPECT_EQ((*bytes)[64], std::byte{0}) << "flags";
    const std::vector<std::byte> inner = expected_inner(version);
    std::vector<std::byte> length;
    le(length, inner.size(), 4);
    EXPECT_TRUE(std::equal(length.begin(), length.end(), bytes->begin() + 65));
    // E2B's LZ4 frame: magic, then FLG 0x74 (version 1, independent blocks,
    // block checksums, content checksum, no content size), BD 0x70 (4 MiB).
    std::vector<std::byte> descriptor;
    raw(descriptor, {0x04, 0x22, 0x4d, 0x18, 0x74, 0x70});
    EXPECT_TRUE(std::equal(descriptor.begin(), descriptor.end(), bytes->begin() + 69));
    EXPECT_EQ(lz4_content(std::span(*bytes).subspan(69)), inner);
  }
}

TEST(HeaderV4V5Test, ReadsHandBuiltBytes) {
  for (uint64_t version : {4, 5}) {
    SCOPED_TRACE(version);
    Result<Header> parsed =
        Header::parse(header_object(sample45(version), expected_inner(version)));
    ASSERT_TRUE(parsed) << parsed.status().to_string();
    EXPECT_EQ(*parsed, trimmed45(version));
    EXPECT_EQ(parsed->codec_of(kA), Codec::kZstd);
    EXPECT_EQ(parsed->codec_of(kB), Codec::kLz4);
    EXPECT_EQ(parsed->codec_of(kC), Codec::kNone);
    EXPECT_EQ(parsed->codec_of(kD), std::nullopt) << "no entry: its own header says";
    ASSERT_NE(parsed->find_build(kB), nullptr);
    EXPECT_EQ(parsed->find_build(kB)->frame_table.frames.size(), 2u);
    EXPECT_EQ(parsed->find_build(kD), nullptr);
  }
}

TEST(HeaderV4V5Test, TheOwnBuildWithoutAnEntryIsUncompressed) {
  Header h = trimmed45(4);
  h.build_id = kD;
  EXPECT_EQ(h.codec_of(kD), Codec::kNone);
  h.version = 3;
  h.builds.clear();
  EXPECT_EQ(h.codec_of(kB), Codec::kNone) << "a version 3 header knows only plain builds";
}

TEST(HeaderV4V5Test, DataFilesAreNamedByCodec) {
  EXPECT_EQ(data_file_suffix(Codec::kNone), "");
  EXPECT_EQ(data_file_suffix(Codec::kZstd), ".zstd");
  EXPECT_EQ(data_file_suffix(Codec::kLz4), ".lz4");
  EXPECT_EQ(codec_name(Codec::kZstd), "zstd");
  EXPECT_EQ(codec_from_id(1), Codec::kZstd);
  EXPECT_EQ(codec_from_id(2), Codec::kLz4);
  EXPECT_EQ(codec_from_id(3), std::nullopt);
}

// Random valid headers: page-granular mappings over up to four builds, some
// compressed with tables already trimmed to what the mappings reach (so a
// round trip gives them back whole), some with entries, some without.
Header random45(std::mt19937_64& rng, uint64_t version) {
  Header h;
  h.version = version;
  h.block_size = rng() % 3 == 0 ? 2 << 20 : 4096;
  const uint64_t pages = 1 + rng() % 60;
  h.size = pages * kPage - (h.block_size == 4096 ? rng() % kPage : 0);
  h.generation = rng() % 5;
  h.build_id = id(0x10);
  h.base_build_id = id(0x11);
  const int builds = 1 + static_cast<int>(rng() % 4);
  std::vector<uint64_t> data_pages(builds);
  for (int b = 0; b < builds; ++b) data_pages[b] = 1 + rng() % 40;
  for (uint64_t page = 0; page < pages;) {
    const uint64_t run = std::min<uint64_t>(pages - page, 1 + rng() % 5);
    const int b = static_cast<int>(rng() % (builds + 1)) - 1;  // -1: zeros
    if (b < 0 || data_pages[b] < run) {
      if (!h.mappings.empty() && h.mappings.back().build_id.is_nil() && version == 5) {
        h.mappings.back().length += run * kPage;
      } else {
        h.mappings.push_back(
            {page * kPage, run * kPage, Uuid::nil(), version == 4 ? (rng() % 9) * kPage : 0});
      }
    } else {
      h.mappings.push_back({page * kPage, run * kPage, id(static_cast<uint8_t>(0x10 + b)),
                            (rng() % (data_pages[b] - run + 1)) * kPage});
    }
    page += run;
  }
  for (int b = 0; b < builds; ++b) {
    if (rng() % 4 == 0) continue;  // no entry
    BuildInfo info{id(static_cast<uint8_t>(0x10 + b)),
                   data_pages[b] * kPage,
                   sha(static_cast<uint8_t>(b)),
                   {}};
    if (rng() % 3 != 0) {
      info.frame_table.codec = rng() % 2 ? Codec::kZstd : Codec::kLz4;
      std::vector<std::pair<uint64_t, uint64_t>> taken;
      for (const Mapping& m : h.mappings) {
        if (m.build_id == info.build_id)
          taken.emplace_back(m.build_storage_offset, m.end() - m.offset);
      }
      uint64_t at_c = 0;
      for (uint64_t at = 0; at < data_pages[b];) {
        const uint64_t frame_pages = std::min<uint64_t>(data_pages[b] - at, 1 + rng() % 4);
        const Frame f{at * kPage, at_c, static_cast<uint32_t>(frame_pages * kPage),
                      static_cast<uint32_t>(1 + rng() % 5000)};
        at_c += f.size_c + rng() % 3;
        at += frame_pages;
        bool reached = taken.empty();
        for (const auto& [start, length] : taken) {
          reached = reached || (f.start_u < start + length && start < f.end_u());
        }
        if (reached) info.frame_table.frames.push_back(f);
      }
    }
    h.builds.push_back(info);
  }
  return h;
}

TEST(HeaderV4V5Test, RoundTripsKeepEverything) {
  std::vector<Header> cases;
  for (uint64_t version : {4, 5}) {
    cases.push_back(trimmed45(version));
    Header plain = trimmed45(version);  // no frame tables at all
    for (BuildInfo& b : plain.builds) b.frame_table = {};
    cases.push_back(plain);
    Header no_builds = trimmed45(version);
    no_builds.builds.clear();
    cases.push_back(no_builds);
    Header zeros;  // a device of zeros
    zeros.version = version;
    zeros.size = 10 * kPage;
    zeros.build_id = zeros.base_build_id = kA;
    zeros.mappings = {{0, 10 * kPage, Uuid::nil(), 0}};
    cases.push_back(zeros);
    Header empty = zeros;  // no device at all
    empty.size = 0;
    empty.mappings.clear();
    cases.push_back(empty);
    Header huge_pages = trimmed45(version);  // 4 KiB mappings under 2 MiB blocks
    huge_pages.block_size = 2 << 20;
    cases.push_back(huge_pages);
  }
  std::mt19937_64 rng(45);
  for (int round = 0; round < 300; ++round) cases.push_back(random45(rng, 4 + round % 2));
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_TRUE(cases[i].validate().is_ok()) << cases[i].validate().to_string();
    Result<std::vector<std::byte>> bytes = cases[i].serialize();
    ASSERT_TRUE(bytes) << bytes.status().to_string();
    Result<Header> parsed = Header::parse(*bytes);
    ASSERT_TRUE(parsed) << parsed.status().to_string();
    EXPECT_EQ(*parsed, cases[i]);
    EXPECT_EQ(*parsed->serialize(), *bytes);
    if (cases[i].version == 5) {
      // The same mappings written as version 4 read back the same.
      Header v4 = cases[i];
      v4.version = 4;
      Result<Header> again = Header::parse(*v4.serialize());
      ASSERT_TRUE(again) << again.status().to_string();
      EXPECT_EQ(again->mappings, cases[i].mappings);
    }
  }
}

TEST(HeaderV4V5Test, WritesOnlyTheFramesTheMappingsReach) {
  Header h = trimmed45(5);
  // A build no mapping names keeps its whole table.
  h.builds.push_back({id(0xe5),
                      8 * kPage,
                      sha(5),
                      {Codec::kZstd, {{0, 0, 4 * kPage, 10}, {4 * kPage, 10, 4 * kPage, 10}}}});
  Result<Header> parsed = Header::parse(*sample45(5).serialize());
  ASSERT_TRUE(parsed);
  EXPECT_EQ(*parsed, trimmed45(5));
  parsed = Header::parse(*h.serialize());
  ASSERT_TRUE(parsed);
  EXPECT_EQ(parsed->builds.back().frame_table.frames.size(), 2u);
}

TEST(HeaderV4V5Test, EveryTruncationIsRefused) {
  for (uint64_t version : {4, 5}) {
    const std::vector<std::byte> good = *sample45(version).serialize();
    for (size_t length = 0; length < good.size(); ++length) {
      EXPECT_FALSE(Header::parse(std::span(good).first(length)))
          << "version " << version << " accepted cut at " << length;
    }
  }
}

// Flips every bit of a serialized header. Past the metadata every flip must
// be refused (the LZ4 frame's checksums, the flags and length checks); in the
// metadata only the fields nothing else vouches for may change.
TEST(HeaderV4V5Test, EveryBitFlipIsRefusedOrChangesOnlyAnUncheckedField) {
  for (uint64_t version : {4, 5}) {
    const Header good_header = trimmed45(version);
    const std::vector<std::byte> good = *good_header.serialize();
    for (size_t at = 0; at < good.size(); ++at) {
      for (int bit = 0; bit < 8; ++bit) {
        std::vector<std::byte> bad = good;
        bad[at] ^= std::byte(1 << bit);
        Result<Header> parsed = Header::parse(bad);
        if (!parsed) continue;
        Header expected = good_header;
        const bool in_size = at >= 16 && at < 24;
        if (at >= 24 && at < 32) {
          expected.generation = parsed->generation;
        } else if (at >= 32 && at < 48) {
          expected.build_id = parsed->build_id;
        } else if (at >= 48 && at < 64) {
          expected.base_build_id = parsed->base_build_id;
        } else if (in_size) {
          // A size within the same last page tiles the same pages. Version 5
          // stores no zero ranges, the one at the end included: a larger
          // size there only reads as more zeros at the end.
          const uint64_t pages = (parsed->size + kPage - 1) / kPage;
          const uint64_t good_pages = (good_header.size + kPage - 1) / kPage;
          if (version == 5 && pages > good_pages) {
            expected.mappings.push_back(
                {good_pages * kPage, (pages - good_pages) * kPage, Uuid::nil(), 0});
          } else {
            EXPECT_EQ(pages, good_pages) << "byte " << at << " bit " << bit;
          }
          expected.size = parsed->size;
        } else {
          ADD_FAILURE() << "version " << version << ": a flip of bit " << bit << " of byte " << at
                        << " was accepted";
          continue;
        }
        EXPECT_EQ(*parsed, expected) << "byte " << at << " bit " << bit;
      }
    }
  }
}

TEST(HeaderV4V5Test, AnUnfinishedUploadIsRefused) {
  for (uint64_t version : {4, 5}) {
    EXPECT_HAS(parse_error(header_object(sample45(version), expected_inner(version), 0x01)),
               "upload that has not finished");
    EXPECT_HAS(parse_error(header_object(sample45(version), expected_inner(version), 0x02)),
               "unknown flags 0x02");
  }
}

TEST(HeaderV4V5Test, TheInnerBlockMustBeOneWholeCheckedFrame) {
  const Header h = sample45(5);
  const std::vector<std::byte> inner = expected_inner(5);
  // The length field against what the frame holds.
  const std::vector<std::byte> good = *h.serialize();
  for (int change : {-1, 1}) {
    std::vector<std::byte> bad = good;
    std::vector<std::byte> length;
    le(length, inner.size() + change, 4);
    std::copy(length.begin(), length.end(), bad.begin() + 65);
    EXPECT_HAS(parse_error(bad),
               change < 0
                   ? "does not decode into the " + std::to_string(inner.size() - 1)
                   : "holds " + std::to_string(inner.size()) + " bytes, its length field says " +
                         std::to_string(inner.size() + 1));
  }
  EXPECT_HAS(parse_error(header_object(h, inner, 0, inner.size() + 1)), "its length field");
  std::vector<std::byte> trailing = header_object(h, inner);
  trailing.push_back(std::byte{0});
  EXPECT_HAS(parse_error(trailing), "1 bytes follow the inner block's LZ4 frame");
  std::vector<std::byte> unchecked = metadata_bytes(h);
  unchecked.push_back(std::byte{0});
  le(unchecked, inner.size(), 4);
  const std::vector<std::byte> frame = lz4_one_shot(inner, /*checksum=*/false);
  unchecked.insert(unchecked.end(), frame.begin(), frame.end());
  EXPECT_HAS(parse_error(unchecked), "no content checksum");
  std::vector<std::byte> not_lz4 = metadata_bytes(h);
  raw(not_lz4, {0, 8, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8});
  EXPECT_HAS(parse_error(not_lz4), "not in an LZ4 frame");
  std::vector<std::byte> inner_trailing = inner;
  inner_trailing.push_back(std::byte{0});
  EXPECT_HAS(parse_error(header_object(h, inner_trailing)), "1 bytes follow the mappings");
}

TEST(HeaderV4V5Test, ReadsTheFramesOfOtherLz4Writers) {
  // 3000 builds of random checksums: an inner block of ~190 KiB, partly
  // incompressible, so in 64 KiB blocks some are stored as they are.
  Header h = sample45(4);
  h.builds.clear();
  std::mt19937_64 rng(3);
  for (uint32_t i = 0; i < 3000; ++i) {
    Uuid u = id(0x30);
    u.bytes[0] = static_cast<uint8_t>(i >> 8), u.bytes[1] = static_cast<uint8_t>(i);
    BuildInfo b{u, 0, {}, {}};
    for (uint8_t& byte : b.sha256) byte = static_cast<uint8_t>(rng());
    h.builds.push_back(b);
  }
  const std::vector<std::byte> ours = *h.serialize();
  const std::vector<std::byte> inner = lz4_content(std::span(ours).subspan(69));
  for (const auto mode : {LZ4F_blockLinked, LZ4F_blockIndependent}) {
    for (const auto block_checksum : {LZ4F_noBlockChecksum, LZ4F_blockChecksumEnabled}) {
      LZ4F_preferences_t prefs{};
      prefs.frameInfo.blockSizeID = LZ4F_max64KB;
      prefs.frameInfo.blockMode = mode;
      prefs.frameInfo.blockChecksumFlag = block_checksum;
      prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
      std::vector<std::byte> frame(LZ4F_compressFrameBound(inner.size(), &prefs));
      const size_t n =
          LZ4F_compressFrame(frame.data(), frame.size(), inner.data(), inner.size(), &prefs);
      ASSERT_FALSE(LZ4F_isError(n));
      frame.resize(n);
      // The metadata, flags and length, then the other writer's frame.
      std::vector<std::byte> bytes = ours;
      bytes.resize(69 + frame.size());
      std::copy(frame.begin(), frame.end(), bytes.begin() + 69);
      Result<Header> parsed = Header::parse(bytes);
      ASSERT_TRUE(parsed) << parsed.status().to_string();
      EXPECT_EQ(*parsed, h);
      // A flipped bit in any block is caught by its checksums.
      bytes[bytes.size() / 2] ^= std::byte{0x04};
      EXPECT_FALSE(Header::parse(bytes));
    }
  }
}

TEST(HeaderV4V5Test, CapsAreEnforcedOnRead) {
  const Header h = sample45(5);
  std::vector<std::byte> inner;
  // The inner block's length.
  EXPECT_HAS(parse_error(header_object(h, expected_inner(5), 0, (256u << 20) + 1)),
             "more than the 268435456 allowed");
  // Builds in the builds section.
  inner.clear();
  le(inner, 65536, 4);
  EXPECT_HAS(parse_error(header_object(h, inner)), "65536 builds, more than the 65535 allowed");
  inner.clear();
  le(inner, 2, 4);
  EXPECT_HAS(parse_error(header_object(h, inner)), "more than its 0 bytes can hold");
  // Frames in one build's table.
  for (uint32_t frames : {(1u << 20) + 1, 3u}) {
    inner.clear();
    le(inner, 1, 4);
    raw_uuid(inner, kA);
    le(inner, 1 << 30, 8);
    for (int i = 0; i < 32; ++i) inner.push_back(std::byte{0});
    le(inner, 1, 4), le(inner, frames, 4);
    le(inner, 0, 8), le(inner, 0, 8), le(inner, kPage, 4), le(inner, 10, 4);  // one frame only
    EXPECT_HAS(parse_error(header_object(h, inner)), frames == 3
                                                         ? "more than the 24 bytes left can hold"
                                                         : "more than the 1048576 allowed");
  }
  // Builds and ranges of a version 5 mapping section.
  for (auto [table, ranges, message] :
       {std::tuple{65536u, 0u, "65536 builds, more than the 65535 allowed"},
        std::tuple{0u, static_cast<uint32_t>(kMaxV5MappedRanges) + 1,
                   "6391321 mapped ranges, more than the 6391320 allowed"},
        std::tuple{0u, 2u, "2 mapped ranges do not fit"}}) {
    inner.clear();
    le(inner, 0, 4);
    le(inner, table, 4);
    if (table == 0) le(inner, ranges, 4);
    EXPECT_HAS(parse_error(header_object(h, inner)), message);
  }
  // Version 4 mappings that the bytes cannot hold.
  inner.clear();
  le(inner, 0, 4);
  le(inner, 2, 4);
  EXPECT_HAS(parse_error(header_object(sample45(4), inner)), "2 mappings do not fit");
}

TEST(HeaderV4V5Test, CapsAreEnforcedOnWrite) {
  Header h = sample45(4);
  h.builds.clear();
  for (uint32_t i = 0; i < 65536; ++i) {
    Uuid u = id(0x20);
    u.bytes[0] = static_cast<uint8_t>(i >> 8), u.bytes[1] = static_cast<uint8_t>(i);
    h.builds.push_back({u, 0, {}, {}});
  }
  EXPECT_HAS(h.validate().message(), "65536 builds, more than the 65535 allowed");
  EXPECT_FALSE(h.serialize());

  Header many = sample45(5);
  many.builds.clear();
  many.size = 65536 * kPage;
  many.mappings.clear();
  for (uint32_t i = 0; i < 65536; ++i) {
    Uuid u = id(0x20);
    u.bytes[0] = static_cast<uint8_t>(i >> 8), u.bytes[1] = static_cast<uint8_t>(i);
    many.mappings.push_back({i * kPage, kPage, u, 0});
  }
  EXPECT_HAS(many.validate().message(), "the mappings name 65536 builds");
  EXPECT_FALSE(many.serialize());

  Header frames = sample45(4);
  FrameTable& table = frames.builds[0].frame_table;
  table.frames.clear();
  for (uint64_t i = 0; i <= kMaxFramesPerBuild; ++i)
    table.frames.push_back({i * kPage, i, kPage, 1});
  frames.builds[0].size = table.frames.back().end_u();
  EXPECT_HAS(frames.validate().message(), "1048577 frames, more than the 1048576 allowed");
  EXPECT_FALSE(frames.serialize());
}

// The message validate() gives for trimmed45(version) changed by `change`,
// after checking that serialize() refuses it too.
std::string invalid(uint64_t version, const std::function<void(Header&)>& change) {
  Header h = trimmed45(version);
  change(h);
  EXPECT_FALSE(h.serialize()) << "serialize accepted what validate should refuse";
  Status status = h.validate();
  return status.is_ok() ? "valid" : status.message();
}

TEST(HeaderV4V5Test, RefusesWhatBreaksTheRules) {
  for (uint64_t v : {4, 5}) {
    SCOPED_TRACE(v);
    EXPECT_HAS(invalid(v, [](Header& h) { std::swap(h.builds[0], h.builds[1]); }),
               "must be sorted and unique");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[2].build_id = h.builds[1].build_id; }),
               "must be sorted and unique");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds.insert(h.builds.begin(), BuildInfo{}); }),
               "is the nil build");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].frame_table.frames[1].start_u -= 1; }),
               "before frame 0 ends");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].frame_table.frames[1].start_c = 999; }),
               "compressed offset 999");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].frame_table.frames[0].size_c = 0; }),
               "each must be from 1 to");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].frame_table.frames[0].size_u = 1u << 31; }),
               "each must be from 1 to");
    EXPECT_HAS(
        invalid(v, [](Header& h) { h.builds[0].frame_table.frames[0].start_u = 1ULL << 63; }),
        "ends past 2^63");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].size = 3 * kPage; }), "past its size");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].size = 0; }), "frames but no size");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[2].size = 1ULL << 63; }), "past 2^63");
    EXPECT_HAS(invalid(v, [](Header& h) { h.mappings[4].build_storage_offset = kPage; }),
               "whose data file is 4096 bytes");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].frame_table.frames.pop_back(); }),
               "which its frames do not cover");
    EXPECT_HAS(invalid(v,
                       [](Header& h) {
                         h.builds[2].frame_table.frames.push_back({0, 0, 1, 1});
                       }),
               "frames without a codec");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].frame_table.frames.clear(); }),
               "codec zstd with no frames");
    EXPECT_HAS(invalid(v, [](Header& h) { h.builds[0].frame_table.codec = static_cast<Codec>(7); }),
               "unknown codec 7");
    EXPECT_HAS(invalid(v, [](Header& h) { h.mappings[0].length = 100; }), "whole pages of 4096");
    EXPECT_HAS(invalid(v, [](Header& h) { h.mappings[0].build_storage_offset = 1ULL << 44; }),
               "past page 2^32 - 1");
    EXPECT_HAS(invalid(v, [](Header& h) { h.mappings.pop_back(); }), "the mappings cover");
    EXPECT_HAS(invalid(v, [](Header& h) { h.size = 1ULL << 45; }), "more than 2^32 - 1 pages");
    EXPECT_HAS(invalid(v, [](Header& h) { h.block_size = 3000; }), "power of two");
  }
  // Version 5 cannot store neighbouring zero ranges, nor a zero range's
  // storage offset; version 4 can (E2B writes both).
  const auto split_zeros = [](Header& h) {
    h.mappings[1].length -= kPage;
    h.mappings.insert(h.mappings.begin() + 2, Mapping{158 * kPage, kPage, Uuid::nil(), 0});
  };
  const auto stored_zeros = [](Header& h) { h.mappings[1].build_storage_offset = 7 * kPage; };
  EXPECT_HAS(invalid(5, split_zeros), "both read as zeros");
  EXPECT_HAS(invalid(5, stored_zeros), "which version 5 cannot store");
  for (const auto& change :
       {std::function<void(Header&)>(split_zeros), std::function<void(Header&)>(stored_zeros)}) {
    Header h = trimmed45(4);
    change(h);
    Result<Header> parsed = Header::parse(*h.serialize());
    ASSERT_TRUE(parsed) << parsed.status().to_string();
    EXPECT_EQ(*parsed, h);
  }
  // A version 3 header has no builds.
  Header v3 = sample();
  v3.builds.push_back({kA, 0, {}, {}});
  EXPECT_HAS(v3.validate().message(), "has no builds section");
}

// parse() on sample45(version)'s hand-built bytes, the inner block changed.
std::string parse_changed(uint64_t version,
                          const std::function<void(std::vector<std::byte>&)>& change) {
  std::vector<std::byte> inner = expected_inner(version);
  change(inner);
  return parse_error(header_object(sample45(version), inner));
}

std::string parse_v5_changed(const std::function<void(V5Columns&)>& change) {
  V5Columns columns;
  change(columns);
  std::vector<std::byte> inner = builds_section_bytes();
  const std::vector<std::byte> mappings = columns.bytes();
  inner.insert(inner.end(), mappings.begin(), mappings.end());
  return parse_error(header_object(sample45(5), inner));
}

TEST(HeaderV4V5Test, RefusesBytesNoWriterMakes) {
  const size_t codec_of_a = 4 + 16 + 8 + 32;
  const size_t size_of_c = builds_section_bytes().size() - 8 - 32 - 8;
  for (uint64_t v : {4, 5}) {
    EXPECT_HAS(parse_changed(v, [&](auto& in) { in[codec_of_a] = std::byte{3}; }),
               "unknown codec 3");
    EXPECT_HAS(parse_changed(v, [&](auto& in) { in[codec_of_a] = std::byte{0}; }),
               "has 2 frames but codec 0");
    EXPECT_HAS(parse_changed(v, [&](auto& in) { in[size_of_c + 7] = std::byte{0x80}; }),
               "has a negative size");
  }
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) {
               c.builds = {1, 0, 2, 3, 2};
             }),
             "not in order of first use");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) { c.table.push_back(id(0xe5)); }),
             "mapped build 4 (e5e5e5e5-e5e5-e5e5-e5e5-e5e5e5e5e5e5) is named by no range");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) {
               c.table.push_back(kD);
               c.builds.back() = 4;
             }),
             "name one build twice");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) {
               c.table.push_back(Uuid::nil());
               c.builds.back() = 4;
             }),
             "include the nil build");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) { c.builds.back() = 9; }), "names build 9 of 4");
  EXPECT_HAS(
      parse_v5_changed([](V5Columns& c) { c.lengths = {0x82, 0x00, 0x03, 0x03, 0x01, 0x01}; }),
      "not in its shortest varint form");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) {
               c.offsets = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02};
             }),
             "overflows 64 bits");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) {
               c.offsets = {0x00, 0x01, 0x03, 0x03, 0x01};
             }),
             "inside the range before it");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) {
               c.lengths = {0x02, 0x00, 0x03, 0x01, 0x01};
             }),
             "mapped range 1 is empty");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) { c.lengths.back() = 0x02; }),
             "ends at page 168, past the device's 167 pages");
  EXPECT_HAS(
      parse_v5_changed([](V5Columns& c) { c.storage = {0x01, 0xd3, 0x04, 0x03, 0x00, 0x06}; }),
      "outside pages 0 to 2^32 - 1");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) { c.count = 6; }),
             "6 mapped ranges do not fit in the 23 bytes left");
  EXPECT_HAS(parse_v5_changed([](V5Columns& c) { c.builds.pop_back(); }),
             "ends inside the build of mapped range 4");
}

TEST(FrameTableTest, FindsFramesByBinarySearchAndSeesGaps) {
  // Frames [0, 10), [10, 30), then a gap, then [50, 60).
  const FrameTable table{Codec::kZstd, {{0, 0, 10, 5}, {10, 5, 20, 7}, {50, 12, 10, 3}}};
  ASSERT_TRUE(table.validate().is_ok());
  EXPECT_EQ(table.find(0), 0u);
  EXPECT_EQ(table.find(9), 0u);
  EXPECT_EQ(table.find(10), 1u);
  EXPECT_EQ(table.find(29), 1u);
  EXPECT_EQ(table.find(30), std::nullopt);
  EXPECT_EQ(table.find(49), std::nullopt);
  EXPECT_EQ(table.find(50), 2u);
  EXPECT_EQ(table.find(60), std::nullopt);
  EXPECT_TRUE(table.covers(5, 25));
  EXPECT_TRUE(table.covers(50, 10));
  EXPECT_FALSE(table.covers(25, 30));
  EXPECT_FALSE(table.covers(55, 10));
  EXPECT_EQ(FrameTable{}.find(0), std::nullopt);
  EXPECT_TRUE(FrameTable{}.validate().is_ok());
}

// ---------------------------------------------------------------------------
// Against the independent Python implementation (tests/e2b_reference).

namespace fs = std::filesystem;

constexpr const char* kPython = "/usr/bin/python3";

// Runs `argv` (argv[0] a path), stdout and stderr to files; its exit status.
int run(const std::vector<std::string>& argv, const fs::path& out, const fs::path& err) {
  testing::SpawnOptions options;
  options.stdin_from = "/dev/null";
  options.stdout_to = out;
  options.stderr_to = err;
  Result<testing::ChildProcess> child = testing::ChildProcess::spawn(argv, options);
  return child ? child->wait() : -1;
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

std::vector<std::byte> slurp_bytes(const fs::path& path) {
  const std::string text = slurp(path);
  const auto* begin = reinterpret_cast<const std::byte*>(text.data());
  return {begin, begin + text.size()};
}

void spill(const fs::path& path, std::span<const std::byte> bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

std::string hex(std::span<const uint8_t> bytes) {
  static const char* kDigits = "0123456789abcdef";
  std::string text;
  for (uint8_t b : bytes) text += {kDigits[b >> 4], kDigits[b & 15]};
  return text;
}

// A header as the reference's `dump` prints it, and back.
nlohmann::json to_json(const Header& h) {
  nlohmann::json doc = {{"version", h.version},
                        {"block_size", h.block_size},
                        {"size", h.size},
                        {"generation", h.generation},
                        {"build_id", h.build_id.to_string()},
                        {"base_build_id", h.base_build_id.to_string()},
                        {"incomplete", false},
                        {"mappings", nlohmann::json::array()},
                        {"builds", nullptr}};
  for (const Mapping& m : h.mappings) {
    doc["mappings"].push_back({{"offset", m.offset},
                               {"length", m.length},
                               {"build_id", m.build_id.to_string()},
                               {"build_storage_offset", m.build_storage_offset}});
  }
  if (h.version != 3) {
    doc["builds"] = nlohmann::json::array();
    for (const BuildInfo& b : h.builds) {
      nlohmann::json frames = nlohmann::json::array();
      for (const Frame& f : b.frame_table.frames) {
        frames.push_back({f.start_u, f.start_c, f.size_u, f.size_c});
      }
      doc["builds"].push_back({{"build_id", b.build_id.to_string()},
                               {"size", b.size},
                               {"sha256", hex(b.sha256)},
                               {"codec", std::string(codec_name(b.frame_table.codec))},
                               {"frames", frames}});
    }
  }
  return doc;
}

Header from_json(const nlohmann::json& doc) {
  Header h;
  h.version = doc["version"];
  h.block_size = doc["block_size"];
  h.size = doc["size"];
  h.generation = doc["generation"];
  h.build_id = *Uuid::parse(doc["build_id"].get<std::string>());
  h.base_build_id = *Uuid::parse(doc["base_build_id"].get<std::string>());
  for (const auto& m : doc["mappings"]) {
    h.mappings.push_back({m["offset"], m["length"], *Uuid::parse(m["build_id"].get<std::string>()),
                          m["build_storage_offset"]});
  }
  if (doc["builds"].is_array()) {
    for (const auto& b : doc["builds"]) {
      BuildInfo info{*Uuid::parse(b["build_id"].get<std::string>()), b["size"], {}, {}};
      const std::string digest = b["sha256"];
      for (size_t i = 0; i < info.sha256.size(); ++i) {
        info.sha256[i] = static_cast<uint8_t>(std::stoi(digest.substr(2 * i, 2), nullptr, 16));
      }
      const std::string codec = b["codec"];
      info.frame_table.codec = codec == "zstd"  ? Codec::kZstd
                               : codec == "lz4" ? Codec::kLz4
                                                : Codec::kNone;
      for (const auto& f : b["frames"]) info.frame_table.frames.push_back({f[0], f[1], f[2], f[3]});
      h.builds.push_back(info);
    }
  }
  return h;
}

class E2bReferenceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> dir = testing::ScratchDir::create();
    ASSERT_TRUE(dir) << dir.status().to_string();
    dir_.emplace(std::move(dir).value());
    if (access(kPython, X_OK) != 0) GTEST_SKIP() << kPython << " is not installed";
    if (run({kPython, "-c", "import lz4.frame, zstandard"}, path("probe.out"), path("probe.err")) !=
        0) {
      GTEST_SKIP() << "the reference needs Debian's python3-lz4 and python3-zstandard: "
                   << slurp(path("probe.err"));
    }
  }

  fs::path path(const std::string& name) const { return dir_->path() / name; }

  // Runs the reference with `args`; its stdout, or a failure with its stderr.
  std::string reference(std::vector<std::string> args) {
    args.insert(args.begin(), {kPython, LAZYBLOCK_E2B_REFERENCE});
    const int status = run(args, path("ref.out"), path("ref.err"));
    EXPECT_EQ(status, 0) << "e2b.py " << args[2] << ": " << slurp(path("ref.err"));
    return slurp(path("ref.out"));
  }

  std::optional<testing::ScratchDir> dir_;
};

// The device image of one generation of a chain: a third of its blocks
// change at each generation, a fifth (moving) read as zeros, the rest stay.
std::string image(size_t blocks, size_t block_size, int generation) {
  std::string out;
  for (size_t b = 0; b < blocks; ++b) {
    const bool zero = (b + static_cast<size_t>(generation)) % 5 == 0;
    const int seed = b % 3 == 0 ? generation : 0;
    for (size_t i = 0; i < block_size; ++i) {
      out.push_back(zero ? '\0' : static_cast<char>(i % 64 == 0 ? b * 7 + 1 : i % 13 + seed + 1));
    }
  }
  return out;
}

TEST_F(E2bReferenceTest, HeadersTheReferenceWritesParseToTheSameHeader) {
  const fs::path store = path("store");
  struct Chain {
    int version;
    std::string codec;
    size_t block_size;
    std::string frame_size;
  };
  struct Written {
    std::string build;
    Codec codec;
    int generation;
  };
  std::vector<Written> written;
  for (const Chain& chain : {Chain{3, "none", 4096, "2MiB"}, Chain{4, "none", 4096, "2MiB"},
                             Chain{4, "zstd", 4096, "16KiB"}, Chain{4, "lz4", 4096, "8KiB"},
                             Chain{5, "none", 4096, "2MiB"}, Chain{5, "zstd", 4096, "8KiB"},
                             Chain{5, "lz4", 4096, "16KiB"}, Chain{5, "zstd", 2 << 20, "2MiB"}}) {
    const size_t blocks = chain.block_size == 4096 ? 48 : 3;
    std::optional<std::string> parent;
    for (int generation = 0; generation < 2; ++generation) {
      char uuid_text[37];
      snprintf(uuid_text, sizeof uuid_text, "00000000-0000-4000-8000-%012zu", written.size() + 1);
      const std::string build = uuid_text;
      const std::string content = image(blocks, chain.block_size, generation);
      spill(path("image"), std::as_bytes(std::span(content)));
      std::vector<std::string> args = {"write",
                                       "--store",
                                       store,
                                       "--build",
                                       build,
                                       "--name",
                                       "disk",
                                       "--block-size",
                                       std::to_string(chain.block_size),
                                       "--codec",
                                       chain.codec,
                                       "--version",
                                       std::to_string(chain.version),
                                       "--frame-size",
                                       chain.frame_size};
      if (parent) args.insert(args.end(), {"--parent", *parent});
      args.push_back(path("image"));
      reference(args);
      written.push_back({build,
                         chain.codec == "zstd"  ? Codec::kZstd
                         : chain.codec == "lz4" ? Codec::kLz4
                                                : Codec::kNone,
                         generation});
      parent = build;
    }
  }
  std::vector<std::string> dump = {"dump"};
  for (const Written& w : written) dump.push_back(store / w.build / "disk.header");
  const nlohmann::json dumped = nlohmann::json::parse(reference(dump));
  ASSERT_EQ(dumped.size(), written.size());
  for (size_t i = 0; i < written.size(); ++i) {
    SCOPED_TRACE(written[i].build);
    const std::vector<std::byte> bytes = slurp_bytes(store / written[i].build / "disk.header");
    Result<Header> parsed = Header::parse(bytes);
    ASSERT_TRUE(parsed) << parsed.status().to_string();
    EXPECT_EQ(*parsed, from_json(dumped[i]));
    EXPECT_EQ(parsed->codec_of(*Uuid::parse(written[i].build)), written[i].codec);
    // Both on the same liblz4, the two writers agree to the byte.
    EXPECT_EQ(*parsed->serialize(), bytes);
    if (parsed->version >= 4 && written[i].generation > 0) {
      EXPECT_EQ(parsed->builds.size(), 2u) << "the parent's entry is inherited";
    }
  }
}

TEST_F(E2bReferenceTest, HeadersWrittenHereReadTheSameInTheReference) {
  std::vector<Header> cases = {trimmed45(4), trimmed45(5), sample45(4), sample45(5)};
  std::mt19937_64 rng(5);
  for (int round = 0; round < 40; ++round) cases.push_back(random45(rng, 4 + round % 2));
  std::vector<std::string> dump = {"dump"};
  std::vector<std::string> encode = {"encode"};
  for (size_t i = 0; i < cases.size(); ++i) {
    Result<std::vector<std::byte>> bytes = cases[i].serialize();
    ASSERT_TRUE(bytes) << bytes.status().to_string();
    const std::string name = "h" + std::to_string(i);
    spill(path(name + ".header"), *bytes);
    std::ofstream(path(name + ".json")) << to_json(cases[i]).dump();
    dump.push_back(path(name + ".header"));
    encode.insert(encode.end(), {path(name + ".json"), path(name + ".there")});
  }
  const nlohmann::json read_there = nlohmann::json::parse(reference(dump));
  reference(encode);
  ASSERT_EQ(read_there.size(), cases.size());
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(i);
    const std::string name = "h" + std::to_string(i);
    const std::vector<std::byte> bytes = slurp_bytes(path(name + ".header"));
    EXPECT_EQ(from_json(read_there[i]), *Header::parse(bytes));
    // And the reference writes the same header to the same bytes.
    EXPECT_EQ(slurp_bytes(path(name + ".there")), bytes);
  }
}

}  // namespace
}  // namespace lazyblock::image
