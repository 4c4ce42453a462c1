#include "image/header.h"

#include <algorithm>
#include <random>

#include <fmt/format.h>

#include "image/header_internal.h"

namespace lazyblock::image {
namespace {

// Blocks from 512 bytes (a sector) to 1 GiB (a gigantic page): anything
// else is not a block size a device uses.
constexpr uint64_t kMinBlockSize = 512;
constexpr uint64_t kMaxBlockSize = 1ULL << 30;

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

using internal::align_up;
using internal::get_le;
using internal::get_uuid;
using internal::put_le;
using internal::put_uuid;

Status bad(std::string message) { return Status::corruption(std::move(message)); }

// The rules every version puts on the metadata.
Status check_metadata(const Header& h) {
  if (h.block_size < kMinBlockSize || h.block_size > kMaxBlockSize ||
      (h.block_size & (h.block_size - 1)) != 0) {
    return bad(fmt::format("block size {} is not a power of two from {} to {}", h.block_size,
                           kMinBlockSize, kMaxBlockSize));
  }
  if (h.size > UINT64_MAX - h.block_size) {
    return bad(fmt::format("device size {} is too large", h.size));
  }
  return Status::ok();
}

Status validate_v3(const Header& h) {
  const uint64_t covered = align_up(h.size, h.block_size);
  if (h.mappings.size() > covered / h.block_size) {
    return bad(fmt::format("{} mappings for a device of {} blocks", h.mappings.size(),
                           covered / h.block_size));
  }
  if (kMetadataBytes + h.mappings.size() * kMappingBytes > kMaxV3HeaderBytes) {
    return bad(fmt::format("{} mappings make a header larger than {} bytes", h.mappings.size(),
                           kMaxV3HeaderBytes));
  }
  if (!h.builds.empty()) {
    return bad(fmt::format("a version 3 header has no builds section, yet {} builds are given",
                           h.builds.size()));
  }
  return internal::check_tiling(h.mappings, h.block_size, covered, "blocks");
}

}  // namespace

Uuid Uuid::random() {
  thread_local std::mt19937_64 rng{std::random_device{}()};
  Uuid id;
  for (size_t i = 0; i < id.bytes.size(); i += 8) {
    const uint64_t bits = rng();
    for (size_t j = 0; j < 8; ++j) id.bytes[i + j] = static_cast<uint8_t>(bits >> (8 * j));
  }
  id.bytes[6] = static_cast<uint8_t>((id.bytes[6] & 0x0f) | 0x40);  // version 4
  id.bytes[8] = static_cast<uint8_t>((id.bytes[8] & 0x3f) | 0x80);  // RFC 4122 variant
  return id;
}

Result<Uuid> Uuid::parse(std::string_view text) {
  const auto invalid = [&] {
    return Status::invalid_argument(
        fmt::format("'{}' is not a UUID (expected 8-4-4-4-12 hex digits, e.g. "
                    "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0)",
                    text));
  };
  if (text.size() != 36) return invalid();
  Uuid id;
  size_t out = 0;
  for (size_t i = 0; i < text.size();) {
    if (i == 8 || i == 13 || i == 18 || i == 23) {
      if (text[i] != '-') return invalid();
      ++i;
      continue;
    }
    const int high = hex_value(text[i]);
    const int low = hex_value(text[i + 1]);
    if (high < 0 || low < 0) return invalid();
    id.bytes[out++] = static_cast<uint8_t>(high << 4 | low);
    i += 2;
  }
  return id;
}

std::string Uuid::to_string() const {
  std::string text;
  text.reserve(36);
  for (size_t i = 0; i < bytes.size(); ++i) {
    if (i == 4 || i == 6 || i == 8 || i == 10) text.push_back('-');
    text += fmt::format("{:02x}", bytes[i]);
  }
  return text;
}

namespace internal {

Status check_tiling(const std::vector<Mapping>& mappings, uint64_t unit, uint64_t covered,
                    std::string_view unit_name) {
  uint64_t next = 0;
  for (size_t i = 0; i < mappings.size(); ++i) {
    const Mapping& m = mappings[i];
    if (m.offset != next) {
      return bad(fmt::format("mapping {} starts at {}, expected {}", i, m.offset, next));
    }
    if (m.length == 0) return bad(fmt::format("mapping {} is empty", i));
    if (m.length % unit != 0 || m.build_storage_offset % unit != 0) {
      return bad(
          fmt::format("mapping {} (length {}, storage offset {}) is not in whole {} "
                      "of {}",
                      i, m.length, m.build_storage_offset, unit_name, unit));
    }
    if (m.length > covered - m.offset) {
      return bad(fmt::format("mapping {} [{}, +{}) runs past the device's end at {}", i, m.offset,
                             m.length, covered));
    }
    if (m.build_storage_offset > UINT64_MAX - m.length) {
      return bad(fmt::format("mapping {}: storage offset {} + length {} overflows", i,
                             m.build_storage_offset, m.length));
    }
    next = m.offset + m.length;
  }
  if (next != covered) {
    return bad(fmt::format("the mappings cover [0, {}), expected [0, {})", next, covered));
  }
  return Status::ok();
}

}  // namespace internal

Status Header::validate() const {
  if (version != 3 && version != 4 && version != 5) {
    return bad(fmt::format("unsupported header version {}", version));
  }
  LB_RETURN_IF_ERROR(check_metadata(*this));
  if (version == 3) return validate_v3(*this);
  return internal::validate_v4v5(*this);
}

Result<Header> Header::parse(std::span<const std::byte> bytes) {
  if (bytes.size() < kMetadataBytes) {
    return Status::corruption(fmt::format("header of {} bytes: shorter than its {}-byte metadata",
                                          bytes.size(), kMetadataBytes));
  }
  Header header;
  header.version = get_le(bytes.data(), 8);
  if (header.version != 3 && header.version != 4 && header.version != 5) {
    return Status::corruption(fmt::format("unsupported header version {}", header.version));
  }
  const uint64_t max_bytes = header.version == 3 ? kMaxV3HeaderBytes : kMaxHeaderBytes;
  if (bytes.size() > max_bytes) {
    return Status::corruption(fmt::format("version {} header of {} bytes: more than the {} allowed",
                                          header.version, bytes.size(), max_bytes));
  }
  header.block_size = get_le(bytes.data() + 8, 8);
  header.size = get_le(bytes.data() + 16, 8);
  header.generation = get_le(bytes.data() + 24, 8);
  header.build_id = get_uuid(bytes.data() + 32);
  header.base_build_id = get_uuid(bytes.data() + 48);
  if (header.version != 3) {
    // The metadata first: its block size and size bound what follows.
    LB_RETURN_IF_ERROR(check_metadata(header));
    LB_RETURN_IF_ERROR(internal::parse_v4v5(bytes.subspan(kMetadataBytes), header));
    LB_RETURN_IF_ERROR(header.validate());
    return header;
  }
  const size_t mapping_bytes = bytes.size() - kMetadataBytes;
  if (mapping_bytes % kMappingBytes != 0) {
    return Status::corruption(
        fmt::format("header of {} bytes: its mappings take {} bytes, not a multiple of {}",
                    bytes.size(), mapping_bytes, kMappingBytes));
  }
  // Bounded by the bytes in hand, which are bounded above.
  header.mappings.reserve(mapping_bytes / kMappingBytes);
  for (size_t at = kMetadataBytes; at < bytes.size(); at += kMappingBytes) {
    const std::byte* record = bytes.data() + at;
    header.mappings.push_back(
        {get_le(record, 8), get_le(record + 8, 8), get_uuid(record + 16), get_le(record + 32, 8)});
  }
  LB_RETURN_IF_ERROR(header.validate());
  return header;
}

Result<std::vector<std::byte>> Header::serialize() const {
  if (Status status = validate(); !status.is_ok()) {
    return Status::invalid_argument("cannot write an invalid header: " + status.message());
  }
  std::vector<std::byte> out;
  out.reserve(kMetadataBytes + (version == 3 ? mappings.size() * kMappingBytes : 0));
  put_le(out, version, 8);
  put_le(out, block_size, 8);
  put_le(out, size, 8);
  put_le(out, generation, 8);
  put_uuid(out, build_id);
  put_uuid(out, base_build_id);
  if (version != 3) {
    LB_RETURN_IF_ERROR(internal::serialize_v4v5(*this, out));
    return out;
  }
  for (const Mapping& m : mappings) {
    put_le(out, m.offset, 8);
    put_le(out, m.length, 8);
    put_uuid(out, m.build_id);
    put_le(out, m.build_storage_offset, 8);
  }
  return out;
}

size_t Header::mapping_at(uint64_t offset) const {
  // The last mapping that starts at or before `offset`.
  auto it = std::upper_bound(mappings.begin(), mappings.end(), offset,
                             [](uint64_t value, const Mapping& m) { return value < m.offset; });
  return static_cast<size_t>(it - mappings.begin()) - 1;
}

const BuildInfo* Header::find_build(const Uuid& build) const {
  auto it = std::lower_bound(builds.begin(), builds.end(), build,
                             [](const BuildInfo& b, const Uuid& id) { return b.build_id < id; });
  return it != builds.end() && it->build_id == build ? &*it : nullptr;
}

std::optional<Codec> Header::codec_of(const Uuid& build) const {
  if (version == 3) return Codec::kNone;
  if (const BuildInfo* info = find_build(build)) return info->frame_table.codec;
  // E2B writes a version 4 or 5 header without an entry for its own build
  // only when that build was uploaded uncompressed.
  if (build == build_id) return Codec::kNone;
  return std::nullopt;
}

std::vector<Mapping> merge_mappings(const std::vector<Mapping>& parent,
                                    const std::vector<Mapping>& changed) {
  std::vector<Mapping> pieces;
  const auto add = [&pieces](Mapping m) {
    if (m.length == 0) return;
    if (!pieces.empty()) {
      Mapping& last = pieces.back();
      const bool one_range = last.build_id == m.build_id &&
                             (m.build_id.is_nil() ||
                              last.build_storage_offset + last.length == m.build_storage_offset);
      if (last.end() == m.offset && one_range) {
        last.length += m.length;
        return;
      }
    }
    if (m.build_id.is_nil()) m.build_storage_offset = 0;
    pieces.push_back(m);
  };
  // The part of parent mapping `m` within [begin, end).
  const auto parent_part = [](const Mapping& m, uint64_t begin, uint64_t end) {
    Mapping part = m;
    part.offset = std::max(begin, m.offset);
    part.length = std::min(end, m.end()) - part.offset;
    if (!m.build_id.is_nil()) part.build_storage_offset += part.offset - m.offset;
    return part;
  };
  size_t p = 0;
  uint64_t position = 0;
  for (const Mapping& change : changed) {
    // The parent's ranges before this change.
    for (; p < parent.size() && parent[p].offset < change.offset; ++p) {
      if (parent[p].end() > position) {
        add(parent_part(parent[p], position, change.offset));
      }
      if (parent[p].end() > change.offset) break;
    }
    add(change);
    position = change.end();
    while (p < parent.size() && parent[p].end() <= position) ++p;
  }
  for (; p < parent.size(); ++p) {
    if (parent[p].end() > position) {
      add(parent_part(parent[p], position, parent[p].end()));
    }
  }
  return pieces;
}

}  // namespace lazyblock::image
