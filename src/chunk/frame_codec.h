// Compressed frames: each an independent zstd or LZ4 frame holding one
// range of an object's uncompressed bytes (E2B's compressed builds cut a
// data file into 2 MiB frames this way).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace lazyblock {

enum class FrameCodec { kZstd, kLz4 };

std::string_view frame_codec_name(FrameCodec codec);

// Decompresses one whole frame into `out`, which must be exactly as large as
// the frame's uncompressed bytes: kCorruption if the frame is damaged, fails
// its checksum, or holds more or fewer bytes than `out`. Nothing of a frame
// that fails is to be trusted, so callers publish `out` only on OK.
Status decompress_frame(FrameCodec codec, std::span<const std::byte> frame,
                        std::span<std::byte> out);

// One frame holding `data`, with a content checksum (zstd: level `level`,
// 0 for the library's default; LZ4: a level of 0 or less is its fast mode).
Result<std::vector<std::byte>> compress_frame(FrameCodec codec, int level,
                                              std::span<const std::byte> data);

}  // namespace lazyblock
