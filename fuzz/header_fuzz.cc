// libFuzzer target: image::Header::parse on arbitrary bytes, every version.
//
// Inputs come in two forms, told apart by their first byte:
//   'H' then the bytes of a header object, parsed as they are;
//   'I' then a selector byte, 64 bytes of metadata and a version 4 or 5
//       inner block, which the target frames itself (flags 0, the length,
//       an LZ4 frame): so mutations reach the builds and mappings parsers
//       instead of dying on the LZ4 frame's checksums.
// Anything else is parsed as a header object too.
//
// Whatever parse accepts must be valid and write back: version 3 to the very
// same bytes; versions 4 and 5 to bytes that parse to the same header, but
// for the frames no mapping reaches (serialize() leaves them out, as E2B
// does), and that write back to themselves.
#include <lz4frame.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>
#include <vector>

#include "image/header.h"

namespace {

using lazyblock::Result;
using lazyblock::image::BuildInfo;
using lazyblock::image::Header;

void check(bool condition) {
  if (!condition) std::abort();
}

// The inner-block form made into a header object.
std::vector<std::byte> framed(std::span<const uint8_t> input) {
  std::vector<std::byte> out;
  if (input.size() < 1 + 64) return out;
  const uint8_t version = 4 + (input[0] & 1);
  for (size_t i = 1; i < 1 + 64; ++i) out.push_back(std::byte(input[i]));
  for (size_t i = 0; i < 8; ++i) out[i] = std::byte(i == 0 ? version : 0);
  const std::span<const uint8_t> inner = input.subspan(1 + 64);
  out.push_back(std::byte{0});
  for (int i = 0; i < 4; ++i)
    out.push_back(std::byte(static_cast<uint8_t>(inner.size() >> (8 * i))));
  LZ4F_preferences_t prefs{};
  prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
  const size_t at = out.size();
  out.resize(at + LZ4F_compressFrameBound(inner.size(), &prefs));
  const size_t n =
      LZ4F_compressFrame(out.data() + at, out.size() - at, inner.data(), inner.size(), &prefs);
  check(!LZ4F_isError(n));
  out.resize(at + n);
  return out;
}

// Whether `kept` holds only frames of `all`, in order.
bool frames_within(const BuildInfo& kept, const BuildInfo& all) {
  auto from = all.frame_table.frames.begin();
  for (const auto& frame : kept.frame_table.frames) {
    from = std::find(from, all.frame_table.frames.end(), frame);
    if (from == all.frame_table.frames.end()) return false;
    ++from;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> input(data, size);
  std::vector<std::byte> bytes;
  if (!input.empty() && input[0] == 'I') {
    bytes = framed(input.subspan(1));
  } else {
    const std::span<const uint8_t> object =
        !input.empty() && input[0] == 'H' ? input.subspan(1) : input;
    const auto* begin = reinterpret_cast<const std::byte*>(object.data());
    bytes.assign(begin, begin + object.size());
  }
  Result<Header> header = Header::parse(bytes);
  if (!header) return 0;
  check(header->validate().is_ok());
  Result<std::vector<std::byte>> written = header->serialize();
  check(written.is_ok());
  if (header->version == 3) {
    check(*written == bytes);
  } else {
    Result<Header> again = Header::parse(*written);
    check(again.is_ok());
    check(*again->serialize() == *written);
    Header expected = *header;
    check(again->builds.size() == expected.builds.size());
    for (size_t i = 0; i < expected.builds.size(); ++i) {
      check(frames_within(again->builds[i], expected.builds[i]));
      expected.builds[i].frame_table.frames = again->builds[i].frame_table.frames;
    }
    check(*again == expected);
  }
  for (const auto& m : header->mappings) {
    // Every mapping holds its first byte, and a compressed build's frame
    // table finds the frame holding the first byte the mapping takes.
    check(header->mappings[header->mapping_at(m.offset)] == m);
    if (m.build_id.is_nil()) continue;
    if (const BuildInfo* build = header->find_build(m.build_id);
        build && build->frame_table.compressed()) {
      const auto frame = build->frame_table.find(m.build_storage_offset);
      check(frame.has_value());
      const auto& f = build->frame_table.frames[*frame];
      check(f.start_u <= m.build_storage_offset && m.build_storage_offset < f.end_u());
    }
  }
  return 0;
}
