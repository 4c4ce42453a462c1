#include "image/frame_table.h"

#include <algorithm>
#include <limits>

#include <fmt/format.h>

namespace lazyblock::image {
namespace {

constexpr uint64_t kMaxOnDiskOffset = std::numeric_limits<int64_t>::max();
constexpr uint32_t kMaxOnDiskSize = std::numeric_limits<int32_t>::max();

}  // namespace

std::string_view codec_name(Codec codec) {
  switch (codec) {
    case Codec::kNone:
      return "none";
    case Codec::kZstd:
      return "zstd";
    case Codec::kLz4:
      return "lz4";
  }
  return "unknown";
}

std::optional<Codec> codec_from_id(uint32_t id) {
  switch (id) {
    case static_cast<uint32_t>(Codec::kNone):
    case static_cast<uint32_t>(Codec::kZstd):
    case static_cast<uint32_t>(Codec::kLz4):
      return static_cast<Codec>(id);
    default:
      return std::nullopt;
  }
}

std::string_view data_file_suffix(Codec codec) {
  switch (codec) {
    case Codec::kNone:
      return "";
    case Codec::kZstd:
      return ".zstd";
    case Codec::kLz4:
      return ".lz4";
  }
  return "";
}

std::optional<size_t> FrameTable::find(uint64_t offset) const {
  // The last frame that starts at or before `offset`.
  auto it = std::upper_bound(frames.begin(), frames.end(), offset,
                             [](uint64_t value, const Frame& f) { return value < f.start_u; });
  if (it == frames.begin()) return std::nullopt;
  --it;
  if (offset >= it->end_u()) return std::nullopt;
  return static_cast<size_t>(it - frames.begin());
}

bool FrameTable::covers(uint64_t offset, uint64_t length) const {
  if (length == 0) return true;
  std::optional<size_t> index = find(offset);
  if (!index) return false;
  const uint64_t end = offset + length;
  // Walk on while the next frame starts where this one ends.
  for (size_t i = *index; i < frames.size(); ++i) {
    if (i > *index && frames[i].start_u != frames[i - 1].end_u()) return false;
    if (frames[i].end_u() >= end) return true;
  }
  return false;
}

Status FrameTable::validate() const {
  const auto bad = [](std::string message) { return Status::corruption(std::move(message)); };
  if (!codec_from_id(static_cast<uint32_t>(codec))) {
    return bad(fmt::format("unknown codec {}", static_cast<uint32_t>(codec)));
  }
  if (codec == Codec::kNone) {
    if (!frames.empty()) {
      return bad(fmt::format("{} frames without a codec", frames.size()));
    }
    return Status::ok();
  }
  // E2B reads a codec with no frames as "uncompressed"; a table that says
  // otherwise could not be written and read back the same.
  if (frames.empty()) return bad(fmt::format("codec {} with no frames", codec_name(codec)));
  if (frames.size() > kMaxFramesPerBuild) {
    return bad(
        fmt::format("{} frames, more than the {} allowed", frames.size(), kMaxFramesPerBuild));
  }
  for (size_t i = 0; i < frames.size(); ++i) {
    const Frame& f = frames[i];
    if (f.size_u == 0 || f.size_c == 0 || f.size_u > kMaxOnDiskSize || f.size_c > kMaxOnDiskSize) {
      return bad(
          fmt::format("frame {} has sizes {} (uncompressed) and {} (compressed): each must "
                      "be from 1 to {}",
                      i, f.size_u, f.size_c, kMaxOnDiskSize));
    }
    if (f.start_u > kMaxOnDiskOffset - f.size_u || f.start_c > kMaxOnDiskOffset - f.size_c) {
      return bad(fmt::format("frame {} at {} (uncompressed), {} (compressed) ends past 2^63", i,
                             f.start_u, f.start_c));
    }
    if (i == 0) continue;
    const Frame& before = frames[i - 1];
    if (f.start_u < before.end_u()) {
      return bad(
          fmt::format("frame {} starts at uncompressed offset {}, before frame {} ends "
                      "at {}",
                      i, f.start_u, i - 1, before.end_u()));
    }
    if (f.start_c < before.end_c()) {
      return bad(fmt::format("frame {} starts at compressed offset {}, before frame {} ends at {}",
                             i, f.start_c, i - 1, before.end_c()));
    }
  }
  return Status::ok();
}

}  // namespace lazyblock::image
