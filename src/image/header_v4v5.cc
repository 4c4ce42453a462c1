// Header versions 4 and 5: E2B's layout for builds whose data files may be
// compressed (docs/formats.md, "Header versions 4 and 5").
//
// After the 64-byte metadata:
//   u8  flags                bit 0: an upload that had not finished (refused);
//                            no other bit is defined (refused)
//   u32 inner block length   its uncompressed length, at most 256 MiB
//   the inner block, as one LZ4 frame: 4 MiB independent blocks, block and
//   content checksums, no content size (E2B's settings), to the object's end
//
// The inner block, little-endian:
//   u32 builds, then per build, sorted by id:
//     u8[16] id | i64 uncompressed size | u8[32] SHA-256 |
//     u32 codec | u32 frames | frames x {i64 start_u, i64 start_c, i32 size_u, i32 size_c}
//   version 4: u32 mappings, then 40-byte mappings as in version 3
//   version 5, all values in 4 KiB pages, the zero mappings left out:
//     u32 M | M x u8[16] (the builds the mappings name, in order of first use) |
//     u32 N | N uvarint offset deltas (from the previous mapping's offset) |
//     N uvarint lengths | N zigzag varint storage offset deltas (from the
//     previous mapping's) | N uvarint indices into the M builds
//   and nothing after.
#include <lz4.h>
#include <lz4frame.h>
#include <xxhash.h>

#include <algorithm>
#include <limits>
#include <map>

#include <fmt/format.h>

#include "image/header_internal.h"

namespace lazyblock::image::internal {
namespace {

constexpr uint8_t kFlagUnfinishedUpload = 1;
constexpr size_t kBuildFixedBytes = 16 + 8 + 32;
constexpr size_t kFrameTableHeadBytes = 8;
constexpr size_t kFrameBytes = 24;
constexpr size_t kUuidBytes = 16;
// E2B keeps version 5 page numbers, lengths and storage offsets in u32
// columns, for version 4 headers as much as for version 5.
constexpr uint64_t kMaxPages = std::numeric_limits<uint32_t>::max();
constexpr uint64_t kMaxSigned64 = std::numeric_limits<int64_t>::max();

Status bad(std::string message) { return Status::corruption(std::move(message)); }

// Reads little-endian fields and varints from the inner block, refusing to
// run past its end.
class Reader {
 public:
  explicit Reader(std::span<const std::byte> bytes) : bytes_(bytes) {}

  size_t left() const { return bytes_.size() - at_; }

  Status fixed(int width, uint64_t& value, std::string_view what) {
    if (left() < static_cast<size_t>(width)) return ended(what);
    value = get_le(bytes_.data() + at_, width);
    at_ += width;
    return Status::ok();
  }

  Status uuid(Uuid& id, std::string_view what) {
    if (left() < kUuidBytes) return ended(what);
    id = get_uuid(bytes_.data() + at_);
    at_ += kUuidBytes;
    return Status::ok();
  }

  Status raw(std::span<uint8_t> out, std::string_view what) {
    if (left() < out.size()) return ended(what);
    for (uint8_t& byte : out) byte = static_cast<uint8_t>(bytes_[at_++]);
    return Status::ok();
  }

  // An unsigned LEB128 varint of at most 64 bits, in its shortest form (the
  // only form E2B writes, so each value has one encoding).
  Status uvarint(uint64_t& value, std::string_view what) {
    value = 0;
    for (int shift = 0;; shift += 7) {
      if (left() == 0) return ended(what);
      const uint8_t byte = static_cast<uint8_t>(bytes_[at_++]);
      if (shift == 63 && byte > 1) return bad(fmt::format("{} overflows 64 bits", what));
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if ((byte & 0x80) == 0) {
        if (byte == 0 && shift > 0) {
          return bad(fmt::format("{} is not in its shortest varint form", what));
        }
        return Status::ok();
      }
    }
  }

  // A signed varint: zigzag (0, -1, 1, -2, ... as 0, 1, 2, 3, ...), then LEB128.
  Status varint(int64_t& value, std::string_view what) {
    uint64_t zigzag = 0;
    LB_RETURN_IF_ERROR(uvarint(zigzag, what));
    value = static_cast<int64_t>(zigzag >> 1) ^ -static_cast<int64_t>(zigzag & 1);
    return Status::ok();
  }

 private:
  static Status ended(std::string_view what) {
    return bad(fmt::format("the inner block ends inside {}", what));
  }

  std::span<const std::byte> bytes_;
  size_t at_ = 0;
};

void put_uvarint(std::vector<std::byte>& out, uint64_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<std::byte>(value | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<std::byte>(value));
}

void put_varint(std::vector<std::byte>& out, int64_t value) {
  put_uvarint(out, static_cast<uint64_t>(value) << 1 ^ static_cast<uint64_t>(value >> 63));
}

struct CompressionContext {
  LZ4F_cctx* ctx = nullptr;
  ~CompressionContext() { LZ4F_freeCompressionContext(ctx); }
};

// The content of the one LZ4 frame (the frame format of lz4's
// doc/lz4_Frame_format.md) that `frame` must be, exactly `length` bytes of
// it. Read here rather than with LZ4F_decompress(), which sets up buffers as
// large as the frame's blocks (8 MiB for E2B's 4 MiB ones) for every frame:
// this decodes each block straight into the content, which grows only as
// blocks really decode. Any block size and both block modes are read; the
// header checksum, every block checksum and the content checksum (which
// E2B always writes, and this requires) are verified.
Result<std::vector<std::byte>> lz4_decode(std::span<const std::byte> frame, uint32_t length) {
  constexpr uint32_t kMagic = 0x184D2204;
  const auto invalid = [](std::string_view what) {
    return bad(fmt::format("the inner block's LZ4 frame header is not valid: {}", what));
  };
  size_t at = 0;
  const auto field = [&](int width, uint64_t& value) {
    if (frame.size() - at < static_cast<size_t>(width)) return false;
    value = get_le(frame.data() + at, width);
    at += width;
    return true;
  };
  uint64_t magic = 0;
  uint64_t flg = 0;
  uint64_t bd = 0;
  if (!field(4, magic) || !field(1, flg) || !field(1, bd))
    return invalid("the header is cut short");
  if (magic != kMagic) return bad("the inner block is not in an LZ4 frame");
  if ((flg >> 6) != 1 || (flg & 0x02) != 0 || (bd & 0x8f) != 0 || ((bd >> 4) & 7) < 4) {
    return invalid(fmt::format("descriptor {:02x} {:02x}", flg, bd));
  }
  if ((flg & 0x01) != 0) return invalid("it needs a dictionary");
  const bool linked = (flg & 0x20) == 0;
  const bool block_checksums = (flg & 0x10) != 0;
  if ((flg & 0x04) == 0) return bad("the inner block's LZ4 frame has no content checksum");
  uint64_t content_size = 0;
  if ((flg & 0x08) != 0 && !field(8, content_size)) return invalid("the header is cut short");
  uint64_t header_checksum = 0;
  if (!field(1, header_checksum)) return invalid("the header is cut short");
  if (((XXH32(frame.data() + 4, at - 5, 0) >> 8) & 0xff) != header_checksum) {
    return invalid("its checksum does not match");
  }
  if ((flg & 0x08) != 0 && content_size != length) {
    return bad(
        fmt::format("the inner block's LZ4 frame says it holds {} bytes, its length field {}",
                    content_size, length));
  }
  const uint32_t block_max = 1u << (8 + 2 * ((bd >> 4) & 7));  // 64 KiB to 4 MiB
  std::vector<std::byte> out;
  for (size_t block = 0;; ++block) {
    uint64_t word = 0;
    if (!field(4, word))
      return bad(fmt::format("the header ends inside its LZ4 frame ({} of {} bytes decoded)",
                             out.size(), length));
    if (word == 0) break;  // the end mark
    const bool stored = (word & 0x80000000u) != 0;
    const uint32_t size = static_cast<uint32_t>(word & 0x7fffffffu);
    if (size > block_max) {
      return bad(fmt::format("LZ4 block {} is {} bytes, more than the frame's {}", block, size,
                             block_max));
    }
    if (frame.size() - at < size + (block_checksums ? 4u : 0u)) {
      return bad(fmt::format("the header ends inside its LZ4 frame ({} of {} bytes decoded)",
                             out.size(), length));
    }
    const std::byte* data = frame.data() + at;
    at += size;
    uint64_t checksum = 0;
    if (block_checksums && (!field(4, checksum) || XXH32(data, size, 0) != checksum)) {
      return bad(fmt::format("LZ4 block {} of the inner block does not match its checksum", block));
    }
    // Room for what the block can hold: within the frame's block size and
    // the length field, and at most 255 bytes for each byte of a compressed
    // block (LZ4's greatest expansion): never more than the bytes in hand
    // can decode to.
    const size_t room =
        std::min<size_t>({block_max, length - out.size(), stored ? size : size_t{size} * 256 + 64});
    const size_t start = out.size();
    if (stored) {
      if (size > room) {
        return bad(fmt::format("the inner block holds more than the {} bytes its length field says",
                               length));
      }
      out.insert(out.end(), data, data + size);
      continue;
    }
    out.resize(start + room);
    // A linked block may refer to the 64 KiB of content before it.
    const size_t window = linked ? std::min<size_t>(start, 64 * 1024) : 0;
    const int decoded = LZ4_decompress_safe_usingDict(
        reinterpret_cast<const char*>(data), reinterpret_cast<char*>(out.data() + start),
        static_cast<int>(size), static_cast<int>(room),
        reinterpret_cast<const char*>(out.data() + start - window), static_cast<int>(window));
    if (decoded < 0) {
      if (room == length - start) {
        return bad(
            fmt::format("LZ4 block {} of the inner block does not decode into the {} bytes "
                        "its length field leaves",
                        block, room));
      }
      return bad(fmt::format("LZ4 block {} of the inner block does not decode", block));
    }
    out.resize(start + static_cast<size_t>(decoded));
  }
  uint64_t content_checksum = 0;
  if (!field(4, content_checksum)) {
    return bad(fmt::format("the header ends inside its LZ4 frame ({} of {} bytes decoded)",
                           out.size(), length));
  }
  if (XXH32(out.data(), out.size(), 0) != content_checksum) {
    return bad("the inner block does not match its LZ4 content checksum");
  }
  if (at != frame.size()) {
    return bad(fmt::format("{} bytes follow the inner block's LZ4 frame", frame.size() - at));
  }
  if (out.size() != length) {
    return bad(fmt::format("the inner block holds {} bytes, its length field says {}", out.size(),
                           length));
  }
  return out;
}

// `block` as one LZ4 frame with E2B's settings, appended to `out`. The
// streaming calls, not LZ4F_compressFrame(), which would shrink the block
// size for small inputs and so write another frame descriptor than E2B's.
Status lz4_encode(std::span<const std::byte> block, std::vector<std::byte>& out) {
  LZ4F_preferences_t prefs{};
  prefs.frameInfo.blockSizeID = LZ4F_max4MB;
  prefs.frameInfo.blockMode = LZ4F_blockIndependent;
  prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
  prefs.frameInfo.blockChecksumFlag = LZ4F_blockChecksumEnabled;
  prefs.compressionLevel = 0;  // LZ4's fast mode, as E2B's
  // Blocks straight from `block` rather than through a 4 MiB staging
  // buffer; the blocks, and so the bytes, are the same.
  prefs.autoFlush = 1;
  CompressionContext c;
  if (LZ4F_isError(LZ4F_createCompressionContext(&c.ctx, LZ4F_VERSION))) {
    return Status::io_error("cannot create an LZ4 compression context");
  }
  const size_t start = out.size();
  out.resize(start + LZ4F_HEADER_SIZE_MAX + LZ4F_compressBound(block.size(), &prefs));
  size_t at = start;
  const auto step = [&](size_t written) -> Status {
    if (LZ4F_isError(written)) {
      return Status::io_error(
          fmt::format("LZ4 compression failed: {}", LZ4F_getErrorName(written)));
    }
    at += written;
    return Status::ok();
  };
  LB_RETURN_IF_ERROR(step(LZ4F_compressBegin(c.ctx, out.data() + at, out.size() - at, &prefs)));
  LB_RETURN_IF_ERROR(step(LZ4F_compressUpdate(c.ctx, out.data() + at, out.size() - at, block.data(),
                                              block.size(), nullptr)));
  LB_RETURN_IF_ERROR(step(LZ4F_compressEnd(c.ctx, out.data() + at, out.size() - at, nullptr)));
  out.resize(at);
  return Status::ok();
}

Status read_builds(Reader& in, std::vector<BuildInfo>& builds) {
  uint64_t count = 0;
  LB_RETURN_IF_ERROR(in.fixed(4, count, "the number of builds"));
  if (count > kMaxBuilds) {
    return bad(fmt::format("the builds section has {} builds, more than the {} allowed", count,
                           kMaxBuilds));
  }
  if (count > in.left() / (kBuildFixedBytes + kFrameTableHeadBytes)) {
    return bad(fmt::format("the builds section has {} builds, more than its {} bytes can hold",
                           count, in.left()));
  }
  builds.resize(count);
  for (size_t i = 0; i < count; ++i) {
    BuildInfo& build = builds[i];
    const std::string what = fmt::format("build {}", i);
    uint64_t codec = 0;
    uint64_t frames = 0;
    LB_RETURN_IF_ERROR(in.uuid(build.build_id, what));
    LB_RETURN_IF_ERROR(in.fixed(8, build.size, what));
    LB_RETURN_IF_ERROR(in.raw(build.sha256, what));
    LB_RETURN_IF_ERROR(in.fixed(4, codec, what));
    LB_RETURN_IF_ERROR(in.fixed(4, frames, what));
    const std::string name = fmt::format("build {} ({})", i, build.build_id.to_string());
    if (build.size > kMaxSigned64) {
      return bad(fmt::format("{} has a negative size", name));
    }
    std::optional<Codec> known = codec_from_id(static_cast<uint32_t>(codec));
    if (!known) return bad(fmt::format("{} has unknown codec {}", name, codec));
    if (*known == Codec::kNone && frames != 0) {
      return bad(fmt::format("{} has {} frames but codec 0 (none)", name, frames));
    }
    if (frames > kMaxFramesPerBuild) {
      return bad(fmt::format("{} has {} frames, more than the {} allowed", name, frames,
                             kMaxFramesPerBuild));
    }
    if (frames > in.left() / kFrameBytes) {
      return bad(fmt::format("{} has {} frames, more than the {} bytes left can hold", name, frames,
                             in.left()));
    }
    // E2B reads a codec with no frames as a build stored uncompressed (an
    // empty data file), and writes it back so.
    build.frame_table.codec = frames == 0 ? Codec::kNone : *known;
    build.frame_table.frames.resize(frames);
    for (Frame& frame : build.frame_table.frames) {
      uint64_t size_u = 0;
      uint64_t size_c = 0;
      LB_RETURN_IF_ERROR(in.fixed(8, frame.start_u, name));
      LB_RETURN_IF_ERROR(in.fixed(8, frame.start_c, name));
      LB_RETURN_IF_ERROR(in.fixed(4, size_u, name));
      LB_RETURN_IF_ERROR(in.fixed(4, size_c, name));
      frame.size_u = static_cast<uint32_t>(size_u);
      frame.size_c = static_cast<uint32_t>(size_c);
    }
  }
  return Status::ok();
}

Status read_v4_mappings(Reader& in, std::vector<Mapping>& mappings) {
  uint64_t count = 0;
  LB_RETURN_IF_ERROR(in.fixed(4, count, "the number of mappings"));
  if (count > in.left() / kMappingBytes) {
    return bad(fmt::format("{} mappings do not fit in the {} bytes left", count, in.left()));
  }
  mappings.resize(count);
  for (Mapping& m : mappings) {
    LB_RETURN_IF_ERROR(in.fixed(8, m.offset, "a mapping"));
    LB_RETURN_IF_ERROR(in.fixed(8, m.length, "a mapping"));
    LB_RETURN_IF_ERROR(in.uuid(m.build_id, "a mapping"));
    LB_RETURN_IF_ERROR(in.fixed(8, m.build_storage_offset, "a mapping"));
  }
  return Status::ok();
}

Status read_v5_mappings(Reader& in, uint64_t size, std::vector<Mapping>& mappings) {
  const uint64_t device_pages = size / kPageSize + (size % kPageSize != 0 ? 1 : 0);
  if (device_pages > kMaxPages) {
    return bad(fmt::format("a device of {} bytes has more than 2^32 - 1 pages", size));
  }
  uint64_t table_size = 0;
  LB_RETURN_IF_ERROR(in.fixed(4, table_size, "the number of mapped builds"));
  if (table_size > kMaxBuilds) {
    return bad(fmt::format("the mappings name {} builds, more than the {} allowed", table_size,
                           kMaxBuilds));
  }
  if (table_size > in.left() / kUuidBytes) {
    return bad(
        fmt::format("{} mapped builds do not fit in the {} bytes left", table_size, in.left()));
  }
  std::vector<Uuid> table(table_size);
  for (Uuid& id : table) LB_RETURN_IF_ERROR(in.uuid(id, "the mapped builds"));
  uint64_t count = 0;
  LB_RETURN_IF_ERROR(in.fixed(4, count, "the number of mapped ranges"));
  if (count > kMaxV5MappedRanges) {
    return bad(
        fmt::format("{} mapped ranges, more than the {} allowed", count, kMaxV5MappedRanges));
  }
  // Each range takes at least a byte in each of the four columns.
  if (count > in.left() / 4) {
    return bad(fmt::format("{} mapped ranges do not fit in the {} bytes left", count, in.left()));
  }
  // The columns, in pages (all below 2^32, checked as they come).
  std::vector<uint32_t> offsets(count), lengths(count), stored(count);
  std::vector<uint16_t> builds(count);
  uint64_t offset = 0;
  for (size_t i = 0; i < count; ++i) {
    uint64_t delta = 0;
    LB_RETURN_IF_ERROR(in.uvarint(delta, fmt::format("the offset of mapped range {}", i)));
    if (delta > kMaxPages - offset) {
      return bad(fmt::format("mapped range {} starts past page 2^32 - 1", i));
    }
    offset += delta;
    offsets[i] = static_cast<uint32_t>(offset);
  }
  for (size_t i = 0; i < count; ++i) {
    uint64_t length = 0;
    LB_RETURN_IF_ERROR(in.uvarint(length, fmt::format("the length of mapped range {}", i)));
    if (length > kMaxPages) return bad(fmt::format("mapped range {} is 2^32 pages or longer", i));
    lengths[i] = static_cast<uint32_t>(length);
  }
  int64_t storage = 0;
  for (size_t i = 0; i < count; ++i) {
    int64_t delta = 0;
    LB_RETURN_IF_ERROR(in.varint(delta, fmt::format("the storage offset of mapped range {}", i)));
    // |storage| <= 2^32 - 1 here, so a delta outside that range cannot land
    // inside it, and checking it first keeps the sum from overflowing.
    if (delta < -static_cast<int64_t>(kMaxPages) || delta > static_cast<int64_t>(kMaxPages) ||
        storage + delta < 0 || storage + delta > static_cast<int64_t>(kMaxPages)) {
      return bad(
          fmt::format("the storage offset of mapped range {} is outside pages 0 to "
                      "2^32 - 1",
                      i));
    }
    storage += delta;
    stored[i] = static_cast<uint32_t>(storage);
  }
  // The builds table lists each build once, in the order the ranges first
  // name it (as E2B writes it): one encoding for each set of mappings.
  size_t first_unused = 0;
  for (size_t i = 0; i < count; ++i) {
    uint64_t index = 0;
    LB_RETURN_IF_ERROR(in.uvarint(index, fmt::format("the build of mapped range {}", i)));
    if (index >= table_size) {
      return bad(fmt::format("mapped range {} names build {} of {}", i, index, table_size));
    }
    if (index > first_unused) {
      return bad(
          fmt::format("mapped range {} names build {} before build {} is named: the "
                      "builds are not in order of first use",
                      i, index, first_unused));
    }
    if (index == first_unused) ++first_unused;
    builds[i] = static_cast<uint16_t>(index);
  }
  if (first_unused != table_size) {
    return bad(fmt::format("mapped build {} ({}) is named by no range", first_unused,
                           table[first_unused].to_string()));
  }
  std::vector<Uuid> sorted = table;
  std::sort(sorted.begin(), sorted.end());
  if (!sorted.empty() && sorted.front().is_nil()) {
    return bad("the mapped builds include the nil build, which the gaps stand for");
  }
  if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
    return bad("the mapped builds name one build twice");
  }
  // The ranges with the zero ranges between them put back: count them
  // first, to allocate once.
  size_t total = count;
  uint64_t end = 0;
  for (size_t i = 0; i < count; ++i) {
    if (lengths[i] == 0) return bad(fmt::format("mapped range {} is empty", i));
    if (offsets[i] < end) {
      return bad(
          fmt::format("mapped range {} starts at page {}, inside the range before it "
                      "(which ends at page {})",
                      i, offsets[i], end));
    }
    if (offsets[i] > end) ++total;
    end = uint64_t{offsets[i]} + lengths[i];
    if (end > device_pages) {
      return bad(fmt::format("mapped range {} ends at page {}, past the device's {} pages", i, end,
                             device_pages));
    }
  }
  if (end < device_pages) ++total;
  mappings.clear();
  mappings.reserve(total);
  end = 0;
  for (size_t i = 0; i < count; ++i) {
    if (offsets[i] > end) {
      mappings.push_back({end * kPageSize, (offsets[i] - end) * kPageSize, Uuid::nil(), 0});
    }
    mappings.push_back({uint64_t{offsets[i]} * kPageSize, uint64_t{lengths[i]} * kPageSize,
                        table[builds[i]], uint64_t{stored[i]} * kPageSize});
    end = uint64_t{offsets[i]} + lengths[i];
  }
  if (end < device_pages) {
    mappings.push_back({end * kPageSize, (device_pages - end) * kPageSize, Uuid::nil(), 0});
  }
  return Status::ok();
}

void write_builds(const Header& h, std::vector<std::byte>& out) {
  // The ranges each build's mappings take, for trimming its frame table.
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> taken(h.builds.size());
  for (const Mapping& m : h.mappings) {
    if (m.build_id.is_nil()) continue;
    if (const BuildInfo* build = h.find_build(m.build_id)) {
      taken[static_cast<size_t>(build - h.builds.data())].emplace_back(m.build_storage_offset,
                                                                       m.length);
    }
  }
  put_le(out, h.builds.size(), 4);
  for (size_t b = 0; b < h.builds.size(); ++b) {
    const BuildInfo& build = h.builds[b];
    put_uuid(out, build.build_id);
    put_le(out, build.size, 8);
    for (uint8_t byte : build.sha256) out.push_back(static_cast<std::byte>(byte));
    const std::vector<Frame>& frames = build.frame_table.frames;
    // As E2B: only the frames some mapping reaches; all of them if no
    // mapping names the build.
    std::vector<bool> keep(frames.size(), taken[b].empty());
    for (const auto& [start, length] : taken[b]) {
      auto it = std::upper_bound(frames.begin(), frames.end(), start,
                                 [](uint64_t value, const Frame& f) { return value < f.end_u(); });
      for (; it != frames.end() && it->start_u < start + length; ++it) {
        keep[static_cast<size_t>(it - frames.begin())] = true;
      }
    }
    put_le(out, static_cast<uint32_t>(build.frame_table.codec), 4);
    put_le(out, static_cast<uint64_t>(std::count(keep.begin(), keep.end(), true)), 4);
    for (size_t i = 0; i < frames.size(); ++i) {
      if (!keep[i]) continue;
      put_le(out, frames[i].start_u, 8);
      put_le(out, frames[i].start_c, 8);
      put_le(out, frames[i].size_u, 4);
      put_le(out, frames[i].size_c, 4);
    }
  }
}

void write_v4_mappings(const Header& h, std::vector<std::byte>& out) {
  put_le(out, h.mappings.size(), 4);
  for (const Mapping& m : h.mappings) {
    put_le(out, m.offset, 8);
    put_le(out, m.length, 8);
    put_uuid(out, m.build_id);
    put_le(out, m.build_storage_offset, 8);
  }
}

void write_v5_mappings(const Header& h, std::vector<std::byte>& out) {
  std::vector<const Mapping*> mapped;
  for (const Mapping& m : h.mappings) {
    if (!m.build_id.is_nil()) mapped.push_back(&m);
  }
  // The builds in order of first use, and each range's index among them.
  std::vector<Uuid> table;
  std::map<Uuid, uint64_t> index_of;
  std::vector<uint64_t> indices;
  indices.reserve(mapped.size());
  for (const Mapping* m : mapped) {
    auto [it, added] = index_of.try_emplace(m->build_id, table.size());
    if (added) table.push_back(m->build_id);
    indices.push_back(it->second);
  }
  put_le(out, table.size(), 4);
  for (const Uuid& id : table) put_uuid(out, id);
  put_le(out, mapped.size(), 4);
  uint64_t previous = 0;
  for (const Mapping* m : mapped) {
    put_uvarint(out, m->offset / kPageSize - previous);
    previous = m->offset / kPageSize;
  }
  for (const Mapping* m : mapped) put_uvarint(out, m->length / kPageSize);
  int64_t previous_stored = 0;
  for (const Mapping* m : mapped) {
    const auto stored = static_cast<int64_t>(m->build_storage_offset / kPageSize);
    put_varint(out, stored - previous_stored);
    previous_stored = stored;
  }
  for (uint64_t index : indices) put_uvarint(out, index);
}

}  // namespace

Status validate_v4v5(const Header& h) {
  const bool v5 = h.version == 5;
  const uint64_t covered = align_up(h.size, kPageSize);
  if (covered / kPageSize > kMaxPages) {
    return bad(fmt::format("a device of {} bytes has more than 2^32 - 1 pages", h.size));
  }
  if (h.mappings.size() > covered / kPageSize) {
    return bad(fmt::format("{} mappings for a device of {} pages", h.mappings.size(),
                           covered / kPageSize));
  }
  LB_RETURN_IF_ERROR(check_tiling(h.mappings, kPageSize, covered, "pages"));
  std::vector<Uuid> named;
  size_t mapped_ranges = 0;
  for (size_t i = 0; i < h.mappings.size(); ++i) {
    const Mapping& m = h.mappings[i];
    if (m.build_storage_offset / kPageSize > kMaxPages) {
      return bad(fmt::format("mapping {}: storage offset {} is past page 2^32 - 1", i,
                             m.build_storage_offset));
    }
    if (!m.build_id.is_nil()) {
      named.push_back(m.build_id);
      ++mapped_ranges;
      continue;
    }
    if (v5 && m.build_storage_offset != 0) {
      return bad(
          fmt::format("mapping {} reads as zeros but has storage offset {}, which version 5 "
                      "cannot store",
                      i, m.build_storage_offset));
    }
    if (v5 && i > 0 && h.mappings[i - 1].build_id.is_nil()) {
      return bad(fmt::format("mappings {} and {} both read as zeros: version 5 stores them as one",
                             i - 1, i));
    }
  }
  if (v5 && mapped_ranges > kMaxV5MappedRanges) {
    return bad(fmt::format("{} mapped ranges, more than the {} a version 5 header may hold",
                           mapped_ranges, kMaxV5MappedRanges));
  }
  std::sort(named.begin(), named.end());
  named.erase(std::unique(named.begin(), named.end()), named.end());
  if (named.size() > kMaxBuilds) {
    return bad(fmt::format("the mappings name {} builds, more than the {} allowed", named.size(),
                           kMaxBuilds));
  }
  if (h.builds.size() > kMaxBuilds) {
    return bad(fmt::format("{} builds, more than the {} allowed", h.builds.size(), kMaxBuilds));
  }
  for (size_t i = 0; i < h.builds.size(); ++i) {
    const BuildInfo& build = h.builds[i];
    const std::string name = fmt::format("build {} ({})", i, build.build_id.to_string());
    if (build.build_id.is_nil()) return bad(fmt::format("{} is the nil build", name));
    if (i > 0 && !(h.builds[i - 1].build_id < build.build_id)) {
      return bad(fmt::format("{} is not after build {} ({}): builds must be sorted and unique",
                             name, i - 1, h.builds[i - 1].build_id.to_string()));
    }
    if (build.size > kMaxSigned64)
      return bad(fmt::format("{}: size {} is past 2^63", name, build.size));
    if (Status s = build.frame_table.validate(); !s.is_ok()) return s.with_context(name);
    const std::vector<Frame>& frames = build.frame_table.frames;
    if (!frames.empty() && build.size == 0) {
      return bad(fmt::format("{} has {} frames but no size", name, frames.size()));
    }
    if (!frames.empty() && frames.back().end_u() > build.size) {
      return bad(fmt::format("{}: its frames reach offset {}, past its size {}", name,
                             frames.back().end_u(), build.size));
    }
  }
  for (size_t i = 0; i < h.mappings.size(); ++i) {
    const Mapping& m = h.mappings[i];
    if (m.build_id.is_nil()) continue;
    const BuildInfo* build = h.find_build(m.build_id);
    if (build == nullptr) continue;
    if (build->size != 0 && m.build_storage_offset + m.length > build->size) {
      return bad(fmt::format("mapping {} takes [{}, {}) of build {}, whose data file is {} bytes",
                             i, m.build_storage_offset, m.build_storage_offset + m.length,
                             m.build_id.to_string(), build->size));
    }
    if (build->frame_table.compressed() &&
        !build->frame_table.covers(m.build_storage_offset, m.length)) {
      return bad(fmt::format("mapping {} takes [{}, {}) of build {}, which its frames do not cover",
                             i, m.build_storage_offset, m.build_storage_offset + m.length,
                             m.build_id.to_string()));
    }
  }
  return Status::ok();
}

Status parse_v4v5(std::span<const std::byte> after_metadata, Header& h) {
  const auto in_context = [&h](Status s) {
    return s.is_ok() ? s : s.with_context(fmt::format("version {} header", h.version));
  };
  if (after_metadata.size() < 5) {
    return in_context(
        bad(fmt::format("{} bytes after the metadata, fewer than the flags and the "
                        "inner block's length take",
                        after_metadata.size())));
  }
  const auto flags = static_cast<uint8_t>(after_metadata[0]);
  if ((flags & kFlagUnfinishedUpload) != 0) {
    return in_context(
        bad("it describes an upload that has not finished (flags bit 0): its "
            "data may not all be stored yet"));
  }
  if (flags != 0) return in_context(bad(fmt::format("unknown flags 0x{:02x}", flags)));
  const auto length = static_cast<uint32_t>(get_le(after_metadata.data() + 1, 4));
  if (length > kMaxInnerBlockBytes) {
    return in_context(bad(fmt::format("the inner block is {} bytes, more than the {} allowed",
                                      length, kMaxInnerBlockBytes)));
  }
  Result<std::vector<std::byte>> inner = lz4_decode(after_metadata.subspan(5), length);
  if (!inner) return in_context(inner.status());
  Reader in(*inner);
  LB_RETURN_IF_ERROR(in_context(read_builds(in, h.builds)));
  if (h.version == 5) {
    LB_RETURN_IF_ERROR(in_context(read_v5_mappings(in, h.size, h.mappings)));
  } else {
    LB_RETURN_IF_ERROR(in_context(read_v4_mappings(in, h.mappings)));
  }
  if (in.left() != 0) {
    return in_context(
        bad(fmt::format("{} bytes follow the mappings in the inner block", in.left())));
  }
  return Status::ok();
}

Status serialize_v4v5(const Header& h, std::vector<std::byte>& out) {
  std::vector<std::byte> inner;
  write_builds(h, inner);
  if (h.version == 5) {
    write_v5_mappings(h, inner);
  } else {
    write_v4_mappings(h, inner);
  }
  // E2B refuses to store what it could not read back.
  if (inner.size() > kMaxInnerBlockBytes) {
    return Status::invalid_argument(fmt::format(
        "cannot write a version {} header whose inner block is {} bytes, more than the {} allowed",
        h.version, inner.size(), kMaxInnerBlockBytes));
  }
  out.push_back(std::byte{0});  // flags: a finished upload
  put_le(out, inner.size(), 4);
  return lz4_encode(inner, out);
}

}  // namespace lazyblock::image::internal
