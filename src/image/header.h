// image::Header: the map of a build's device (memfile or rootfs) onto the
// data files of that build and its ancestors, in E2B's template-storage
// format, versions 3, 4 and 5 (docs/formats.md; DESIGN.md, "image — header
// format").
//
// A build stores only the blocks it changed, in its own data file
// (`BUILD/NAME`, or `BUILD/NAME.zstd` / `BUILD/NAME.lz4` when compressed, see
// frame_table.h); its header (`BUILD/NAME.header`) says, for every block of
// the device, which build's data file holds it and where, or that it reads
// as zeros (the nil build id). A device read splits along the mappings.
//
// Byte layout, little-endian, no padding. Every version starts with
//   metadata, 64 bytes: u64 version | u64 block_size | u64 size |
//                       u64 generation | u8[16] build_id | u8[16] base_build_id
// Version 3: the mappings follow to the end of the object, 40 bytes each,
//   sorted by offset: u64 offset | u64 length | u8[16] build_id |
//                     u64 build_storage_offset
// Versions 4 and 5: u8 flags | u32 length of the inner block | the inner
//   block as one LZ4 frame (header_v4v5.cc has the layout). The inner block
//   holds the builds section (per build: its data file's uncompressed size,
//   SHA-256 and frame table), then the mappings: version 4 as the 40-byte
//   records above, version 5 as varint columns in 4 KiB units without the
//   zero ranges, which are implied by the gaps.
//
// The mappings tile the device without gaps or overlaps. Version 3: from 0
// to align_up(size, block_size), offsets, lengths and storage offsets in
// whole blocks. Versions 4 and 5 (E2B's own rule): from 0 to
// align_up(size, 4096), in whole 4 KiB pages even when the blocks are 2 MiB,
// each offset, length and storage offset at most 2^32 - 1 pages. In both the
// device's last block or page may reach past `size`. parse() accepts nothing
// else, and never trusts a length from the bytes to allocate: every count is
// bounded by the bytes in hand, and those by the caps below.
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
#include "image/frame_table.h"

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
  Uuid build_id;                      // whose data file holds the bytes; nil: zeros
  uint64_t build_storage_offset = 0;  // where in that data file

  uint64_t end() const { return offset + length; }
  friend bool operator==(const Mapping&, const Mapping&) = default;
};

constexpr size_t kMetadataBytes = 64;
constexpr size_t kMappingBytes = 40;
// The unit of version 4 and 5 mappings, whatever the block size.
constexpr uint64_t kPageSize = 4096;
// No version 3 header this large is sane (1.6 M mappings); a bigger one is
// refused on read and on write rather than stall every restore that needs it.
constexpr uint64_t kMaxV3HeaderBytes = 64ULL * 1024 * 1024;
// E2B's caps for versions 4 and 5, enforced on read and on write: the
// uncompressed inner block, the builds in a header (the builds section, and
// the distinct builds its mappings name), and the mapped (non-zero) ranges
// of a version 5 mapping section, which E2B bounds by the memory of its
// decoded form (256 MiB / 42 bytes).
constexpr uint64_t kMaxInnerBlockBytes = 256ULL * 1024 * 1024;
constexpr size_t kMaxBuilds = 65535;
constexpr size_t kMaxV5MappedRanges = kMaxInnerBlockBytes / 42;
// The largest header object of any version: a 256 MiB inner block that LZ4
// could not shrink, with room for its frame's block headers and checksums.
constexpr uint64_t kMaxHeaderBytes = kMetadataBytes + 5 + kMaxInnerBlockBytes + 1024 * 1024;

// What a version 4 or 5 header says of one build's data file.
struct BuildInfo {
  Uuid build_id;
  uint64_t size = 0;                 // of the uncompressed data file; 0: unknown
  std::array<uint8_t, 32> sha256{};  // of the uncompressed data file; all zeros: unknown
  FrameTable frame_table;            // codec kNone: stored uncompressed

  friend bool operator==(const BuildInfo&, const BuildInfo&) = default;
};

struct Header {
  uint64_t version = 3;  // 3, 4 or 5: the layout parse() read and serialize() writes
  uint64_t block_size = 4096;
  uint64_t size = 0;        // the device's size in bytes
  uint64_t generation = 0;  // 0 for a build without a parent, parent's + 1 otherwise
  Uuid build_id;
  Uuid base_build_id;  // the first build of the chain (itself for generation 0)
  std::vector<Mapping> mappings;
  // Versions 4 and 5 only (empty in version 3), sorted by build id: the
  // builds whose data files this header knows. A build its mappings name may
  // be missing (see codec_of), and a build no mapping names may be here.
  std::vector<BuildInfo> builds;

  // Parses and validates the bytes of a header object of any version.
  // kCorruption with a message naming the first problem ("mapping 7 starts
  // at 8192, expected 4096"); "unsupported header version N" for versions
  // other than 3, 4 and 5. A version 4 or 5 header of an upload that did not
  // finish (flags bit 0) is refused.
  static Result<Header> parse(std::span<const std::byte> bytes);

  // The bytes of the header object, in the layout of `version`, as E2B's
  // own code writes them (for versions 4 and 5 the inner block is the same
  // byte for byte; the LZ4 frame has E2B's settings, but another LZ4 encoder
  // may choose other matches inside it). As E2B does, a build's frame table
  // is written with only the frames its mappings reach. Fails
  // (kInvalidArgument) on a header that validate() refuses or that is over
  // a cap.
  Result<std::vector<std::byte>> serialize() const;

  // OK if the header keeps every rule above and, for versions 4 and 5: the
  // builds are sorted, unique, not nil, with valid frame tables whose frames
  // end within their build's size; every range a mapping takes from a build
  // lies within that build's size and, if it is compressed, inside its
  // frames; the caps hold. Version 5 also holds no neighbouring zero
  // mappings and no storage offset on a zero mapping, as it cannot store them.
  Status validate() const;

  // The index of the mapping holding device byte `offset` (< size).
  size_t mapping_at(uint64_t offset) const;

  // This header's entry for `build`, or nullptr if it has none.
  const BuildInfo* find_build(const Uuid& build) const;

  // How `build`'s data file is stored, by E2B's rules: every build of a
  // version 3 header, and a version 4 or 5 header's own build when it has
  // no entry, is uncompressed; another build without an entry is unknown
  // here (nullopt): its own header's entry for itself says.
  std::optional<Codec> codec_of(const Uuid& build) const;

  friend bool operator==(const Header&, const Header&) = default;
};

// The mappings of a child build: its parent's, with the device ranges in
// `changed` (sorted, disjoint, block-aligned, each mapped into the child's
// own data file or to nil) laid over them. Neighbouring ranges are joined
// only where they are one range in one file (same build, contiguous storage
// offsets), or both nil.
std::vector<Mapping> merge_mappings(const std::vector<Mapping>& parent,
                                    const std::vector<Mapping>& changed);

}  // namespace lazyblock::image
