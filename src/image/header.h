// image::Header: the map of a build's device (memfile or rootfs) onto the
// data files of that build and its ancestors, in E2B's template-storage
// format, version 3 (DESIGN.md, "image — header format").
//
// A build stores only the blocks it changed, in its own data file
// (`BUILD/NAME`); its header (`BUILD/NAME.header`) says, for every block of
// the device, which build's data file holds it and where, or that it reads
// as zeros (the nil build id). A device read splits along the mappings.
//
// Byte layout, little-endian, no padding:
//   metadata, 64 bytes: u64 version (3) | u64 block_size | u64 size |
//                       u64 generation | u8[16] build_id | u8[16] base_build_id
//   mappings to the end of the object, 40 bytes each, sorted by offset:
//                       u64 offset | u64 length | u8[16] build_id |
//                       u64 build_storage_offset
//
// The mappings tile [0, align_up(size, block_size)) without gaps or
// overlaps: offsets, lengths and storage offsets are multiples of
// block_size, and the device's last block may reach past `size` (a device
// whose size is not a multiple of the block size). parse() accepts nothing
// else, and never trusts a length from the bytes to allocate: the number of
// mappings is bounded by the object's own length, and the object by
// kMaxHeaderBytes.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace lazyblock::image {

// A build's id. The nil id (all zeros) in a mapping means "reads as zeros".
struct Uuid {
  std::array<uint8_t, 16> bytes{};

  static Uuid nil() { return Uuid{}; }
  // A fresh random (version 4) id.
  static Uuid random();
  // "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0" (case-insensitive) -> Uuid.
  static Result<Uuid> parse(std::string_view text);
  // The canonical lower-case form.
  std::string to_string() const;
  bool is_nil() const { return *this == Uuid{}; }
  friend bool operator==(const Uuid&, const Uuid&) = default;
  friend auto operator<=>(const Uuid&, const Uuid&) = default;
};

struct Mapping {
  uint64_t offset = 0;  // in the device
  uint64_t length = 0;
  Uuid build_id;        // whose data file holds the bytes; nil: zeros
  uint64_t build_storage_offset = 0;  // where in that data file

  uint64_t end() const { return offset + length; }
  friend bool operator==(const Mapping&, const Mapping&) = default;
};

constexpr uint64_t kHeaderVersion = 3;
constexpr size_t kMetadataBytes = 64;
constexpr size_t kMappingBytes = 40;
// No header this large is sane (1.6 M mappings); a bigger one is refused on
// read and on write rather than stall every restore that needs it.
constexpr uint64_t kMaxHeaderBytes = 64ULL * 1024 * 1024;

struct Header {
  uint64_t version = kHeaderVersion;
  uint64_t block_size = 4096;
  uint64_t size = 0;        // the device's size in bytes
  uint64_t generation = 0;  // 0 for a build without a parent, parent's + 1 otherwise
  Uuid build_id;
  Uuid base_build_id;       // the first build of the chain (itself for generation 0)
  std::vector<Mapping> mappings;

  // Parses and validates the bytes of a header object. kCorruption with a
  // message naming the first problem ("mapping 7 starts at 8192, expected
  // 4096"); "unsupported header version N" for versions other than 3.
  static Result<Header> parse(std::span<const std::byte> bytes);

  // The bytes of the header object. Fails (kInvalidArgument) on a header
  // that validate() refuses.
  Result<std::vector<std::byte>> serialize() const;

  // OK if the header keeps every rule above.
  Status validate() const;

  // The index of the mapping holding device byte `offset` (< size).
  size_t mapping_at(uint64_t offset) const;
};

// The mappings of a child build: its parent's, with the device ranges in
// `changed` (sorted, disjoint, block-aligned, each mapped into the child's
// own data file or to nil) laid over them. Neighbouring ranges are joined
// only where they are one range in one file (same build, contiguous storage
// offsets), or both nil.
std::vector<Mapping> merge_mappings(const std::vector<Mapping>& parent,
                                    const std::vector<Mapping>& changed);

}  // namespace lazyblock::image
