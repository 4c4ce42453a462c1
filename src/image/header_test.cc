#include "image/header.h"

#include <gtest/gtest.h>

#include <random>

namespace lazyblock::image {
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
  EXPECT_EQ(rejection([](Header& h) { h.version = 4; }), "unsupported header version 4");
  EXPECT_EQ(rejection([](Header& h) { h.version = 5; }), "unsupported header version 5");
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
  EXPECT_NE(rejection([](Header& h) { h.mappings[2].build_storage_offset = 7; })
                .find("whole blocks"),
            std::string::npos);
  EXPECT_NE(rejection([](Header& h) {
              h.mappings[2].build_storage_offset = UINT64_MAX - 4095;
            }).find("overflows"),
            std::string::npos);
  EXPECT_NE(rejection([](Header& h) { h.size = UINT64_MAX; }).find("too large"),
            std::string::npos);
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
  for (const char* bad : {"", "0f1e2d3c4b5a69788796a5b4c3d2e1f0", "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1fg",
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
               overrides.push_back({m.offset / 4096 + i,
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
      EXPECT_FALSE(a.build_id == b.build_id &&
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

}  // namespace
}  // namespace lazyblock::image
