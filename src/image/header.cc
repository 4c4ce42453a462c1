#include "image/header.h"

#include <algorithm>
#include <random>

#include <fmt/format.h>

namespace lazyblock::image {
namespace {

// Blocks from 512 bytes (a sector) to 1 GiB (a gigantic page): anything
// else is not a block size a device uses.
constexpr uint64_t kMinBlockSize = 512;
constexpr uint64_t kMaxBlockSize = 1ULL << 30;

uint64_t get_u64(const std::byte* at) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = value << 8 | static_cast<uint8_t>(at[i]);
  return value;
}

void put_u64(std::vector<std::byte>& out, uint64_t value) {
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::byte>(value >> (8 * i)));
}

Uuid get_uuid(const std::byte* at) {
  Uuid id;
  for (size_t i = 0; i < id.bytes.size(); ++i) id.bytes[i] = static_cast<uint8_t>(at[i]);
  return id;
}

void put_uuid(std::vector<std::byte>& out, const Uuid& id) {
  for (uint8_t byte : id.bytes) out.push_back(static_cast<std::byte>(byte));
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
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
    return Status::invalid_argument(fmt::format(
        "'{}' is not a UUID (expected 8-4-4-4-12 hex digits, e.g. "
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

Status Header::validate() const {
  const auto bad = [](std::string message) { return Status::corruption(std::move(message)); };
  if (version != kHeaderVersion) {
    return bad(fmt::format("unsupported header version {}", version));
  }
  if (block_size < kMinBlockSize || block_size > kMaxBlockSize ||
      (block_size & (block_size - 1)) != 0) {
    return bad(fmt::format("block size {} is not a power of two from {} to {}", block_size,
                           kMinBlockSize, kMaxBlockSize));
  }
  if (size > UINT64_MAX - block_size) return bad(fmt::format("device size {} is too large", size));
  const uint64_t covered = align_up(size, block_size);
  if (mappings.size() > covered / block_size) {
    return bad(fmt::format("{} mappings for a device of {} blocks", mappings.size(),
                           covered / block_size));
  }
  if (kMetadataBytes + mappings.size() * kMappingBytes > kMaxHeaderBytes) {
    return bad(fmt::format("{} mappings make a header larger than {} bytes", mappings.size(),
                           kMaxHeaderBytes));
  }
  uint64_t next = 0;
  for (size_t i = 0; i < mappings.size(); ++i) {
    const Mapping& m = mappings[i];
    if (m.offset != next) {
      return bad(fmt::format("mapping {} starts at {}, expected {}", i, m.offset, next));
    }
    if (m.length == 0) return bad(fmt::format("mapping {} is empty", i));
    if (m.length % block_size != 0 || m.build_storage_offset % block_size != 0) {
      return bad(fmt::format("mapping {} (length {}, storage offset {}) is not in whole blocks "
                             "of {}",
                             i, m.length, m.build_storage_offset, block_size));
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

Result<Header> Header::parse(std::span<const std::byte> bytes) {
  if (bytes.size() > kMaxHeaderBytes) {
    return Status::corruption(
        fmt::format("header of {} bytes: more than the {} allowed", bytes.size(), kMaxHeaderBytes));
  }
  if (bytes.size() < kMetadataBytes) {
    return Status::corruption(fmt::format("header of {} bytes: shorter than its {}-byte metadata",
                                          bytes.size(), kMetadataBytes));
  }
  Header header;
  header.version = get_u64(bytes.data());
  if (header.version != kHeaderVersion) {
    return Status::corruption(fmt::format("unsupported header version {}", header.version));
  }
  header.block_size = get_u64(bytes.data() + 8);
  header.size = get_u64(bytes.data() + 16);
  header.generation = get_u64(bytes.data() + 24);
  header.build_id = get_uuid(bytes.data() + 32);
  header.base_build_id = get_uuid(bytes.data() + 48);
  const size_t mapping_bytes = bytes.size() - kMetadataBytes;
  if (mapping_bytes % kMappingBytes != 0) {
    return Status::corruption(fmt::format(
        "header of {} bytes: its mappings take {} bytes, not a multiple of {}", bytes.size(),
        mapping_bytes, kMappingBytes));
  }
  // Bounded by the bytes in hand, which are bounded above.
  header.mappings.reserve(mapping_bytes / kMappingBytes);
  for (size_t at = kMetadataBytes; at < bytes.size(); at += kMappingBytes) {
    const std::byte* record = bytes.data() + at;
    header.mappings.push_back(
        {get_u64(record), get_u64(record + 8), get_uuid(record + 16), get_u64(record + 32)});
  }
  LB_RETURN_IF_ERROR(header.validate());
  return header;
}

Result<std::vector<std::byte>> Header::serialize() const {
  if (Status status = validate(); !status.is_ok()) {
    return Status::invalid_argument("cannot write an invalid header: " + status.message());
  }
  std::vector<std::byte> out;
  out.reserve(kMetadataBytes + mappings.size() * kMappingBytes);
  put_u64(out, version);
  put_u64(out, block_size);
  put_u64(out, size);
  put_u64(out, generation);
  put_uuid(out, build_id);
  put_uuid(out, base_build_id);
  for (const Mapping& m : mappings) {
    put_u64(out, m.offset);
    put_u64(out, m.length);
    put_uuid(out, m.build_id);
    put_u64(out, m.build_storage_offset);
  }
  return out;
}

size_t Header::mapping_at(uint64_t offset) const {
  // The last mapping that starts at or before `offset`.
  auto it = std::upper_bound(mappings.begin(), mappings.end(), offset,
                             [](uint64_t value, const Mapping& m) { return value < m.offset; });
  return static_cast<size_t>(it - mappings.begin()) - 1;
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
