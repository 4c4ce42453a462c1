// image::FrameTable: where each piece of a compressed data file lies, in E2B's
// format (header versions 4 and 5, docs/formats.md).
//
// A compressed build's data file is a run of independently compressed frames.
// E2B cuts the uncompressed data file into frames of 2 MiB (the last one
// shorter) and compresses each on its own, so one frame can be fetched and
// decompressed without its neighbours. Two address spaces describe the same
// bytes: "U" (offsets in the uncompressed data file, the offsets a header's
// mappings use) and "C" (offsets in the stored, compressed object).
//
// The codec and the object's name go together (E2B's storage paths):
//   codec 0, none: BUILD/NAME        (plain, as in version 3; no frames)
//   codec 1, zstd: BUILD/NAME.zstd   (each frame one zstd frame with a checksum)
//   codec 2, lz4:  BUILD/NAME.lz4    (each frame one LZ4 frame, block checksums)
// The header stays BUILD/NAME.header whatever the codec.
//
// A header keeps only the frames its own mappings reach (E2B trims each
// build's table when it writes a header), so a table may have gaps: frames
// are sorted and never overlap in U or in C, but need not touch.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace lazyblock::image {

enum class Codec : uint32_t {
  kNone = 0,
  kZstd = 1,
  kLz4 = 2,
};

// "none", "zstd", "lz4".
std::string_view codec_name(Codec codec);
// The codec with this id in a header, if there is one.
std::optional<Codec> codec_from_id(uint32_t id);
// What E2B appends to a data file's name for its codec: "", ".zstd", ".lz4".
std::string_view data_file_suffix(Codec codec);

// One frame: uncompressed bytes [start_u, start_u + size_u) of the data file
// are stored compressed at [start_c, start_c + size_c) of its object. On disk
// the starts are signed 64-bit and the sizes signed 32-bit, so validate()
// keeps starts and ends below 2^63 and sizes from 1 to 2^31 - 1.
struct Frame {
  uint64_t start_u = 0;
  uint64_t start_c = 0;
  uint32_t size_u = 0;
  uint32_t size_c = 0;

  uint64_t end_u() const { return start_u + size_u; }
  uint64_t end_c() const { return start_c + size_c; }
  friend bool operator==(const Frame&, const Frame&) = default;
};

// E2B refuses tables of more frames than this (2 TiB of 2 MiB frames).
constexpr uint32_t kMaxFramesPerBuild = 1u << 20;

struct FrameTable {
  Codec codec = Codec::kNone;  // kNone: stored uncompressed, no frames
  std::vector<Frame> frames;   // sorted by start_u

  bool compressed() const { return codec != Codec::kNone; }

  // The index of the frame holding uncompressed byte `offset` (binary
  // search), or nullopt if no frame of this table holds it: before the first,
  // in a gap, past the last.
  std::optional<size_t> find(uint64_t offset) const;

  // Whether every byte of [offset, offset + length) lies in some frame.
  bool covers(uint64_t offset, uint64_t length) const;

  // OK if the table keeps the rules above: a codec that exists, frames only
  // with a codec and then at least one, at most kMaxFramesPerBuild, each of
  // positive sizes within the on-disk ranges, sorted, none overlapping
  // another in U or in C. kCorruption naming the first frame that does not.
  Status validate() const;

  friend bool operator==(const FrameTable&, const FrameTable&) = default;
};

}  // namespace lazyblock::image
