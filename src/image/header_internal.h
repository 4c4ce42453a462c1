// What header.cc (metadata, version 3, dispatch) and header_v4v5.cc
// (versions 4 and 5) share. Not part of the image module's interface.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "image/header.h"

namespace lazyblock::image::internal {

// Little-endian fields, read from bytes the caller has checked are there.
inline uint64_t get_le(const std::byte* at, int bytes) {
  uint64_t value = 0;
  for (int i = bytes - 1; i >= 0; --i) value = value << 8 | static_cast<uint8_t>(at[i]);
  return value;
}
inline void put_le(std::vector<std::byte>& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<std::byte>(value >> (8 * i)));
}
inline Uuid get_uuid(const std::byte* at) {
  Uuid id;
  for (size_t i = 0; i < id.bytes.size(); ++i) id.bytes[i] = static_cast<uint8_t>(at[i]);
  return id;
}
inline void put_uuid(std::vector<std::byte>& out, const Uuid& id) {
  for (uint8_t byte : id.bytes) out.push_back(static_cast<std::byte>(byte));
}

inline uint64_t align_up(uint64_t value, uint64_t alignment) {
  return (value + alignment - 1) / alignment * alignment;
}

// OK if `mappings` tile [0, covered) in whole units of `unit` bytes (offsets,
// lengths, storage offsets), none empty, no storage range overflowing.
// `unit_name` ("blocks", "pages") is for the messages.
Status check_tiling(const std::vector<Mapping>& mappings, uint64_t unit, uint64_t covered,
                    std::string_view unit_name);

// The rules of versions 4 and 5 beyond the metadata's (header_v4v5.cc).
Status validate_v4v5(const Header& header);
// Reads what follows the metadata of a version 4 or 5 header into `header`,
// whose metadata fields are set; does not validate the whole.
Status parse_v4v5(std::span<const std::byte> after_metadata, Header& header);
// The flags, length and LZ4 frame of a valid version 4 or 5 header, appended
// to `out`, which holds its metadata.
Status serialize_v4v5(const Header& header, std::vector<std::byte>& out);

}  // namespace lazyblock::image::internal
