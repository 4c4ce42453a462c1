// Compressed frames: each an independent zstd or LZ4 frame holding one
// range of an object's uncompressed bytes (E2B's compressed builds cut a
// data file into 2 MiB frames this way).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace lazyblock {

enum class FrameCodec { kZstd, kLz4 };

std::string_view frame_codec_name(FrameCodec codec);

// Decompresses one frame as its stored bytes arrive, straight into the
// caller's buffer: a fetch decodes while the rest of the frame is still on
// the wire, and writes out each piece while it is hot in the CPU's cache. A
// decoder is reused frame after frame (its context and buffers are kept).
class FrameDecoder {
 public:
  static Result<std::unique_ptr<FrameDecoder>> create(FrameCodec codec);
  virtual ~FrameDecoder() = default;

  // Starts a frame whose uncompressed bytes are exactly `out` (it must stay
  // valid and untouched by others until finish()).
  virtual Status begin(std::span<std::byte> out) = 0;
  // Decodes the frame's next stored bytes. kCorruption if they are damaged,
  // hold more than `out` takes, or go on past the frame's end.
  virtual Status feed(std::span<const std::byte> stored) = 0;
  // The bytes of `out` decoded so far, from its start. They are not to be
  // trusted (published) before finish() says OK.
  virtual uint64_t decoded() const = 0;
  // After the last stored byte: OK if the frame ended exactly there, its
  // checksum verified and `out` is full; kCorruption saying which not.
  virtual Status finish() = 0;
};

// Decompresses one whole frame into `out`, which must be exactly as large as
// the frame's uncompressed bytes: kCorruption if the frame is damaged, fails
// its checksum, or holds more or fewer bytes than `out`. Nothing of a frame
// that fails is to be trusted, so callers publish `out` only on OK.
Status decompress_frame(FrameCodec codec, std::span<const std::byte> frame,
                        std::span<std::byte> out);

// One frame holding `data`, with its content size and a content checksum
// (LZ4: also block checksums and 4 MiB independent blocks, E2B's settings),
// at compression level `level` (see check_level).
Result<std::vector<std::byte>> compress_frame(FrameCodec codec, int level,
                                              std::span<const std::byte> data);

// The level each codec compresses at unless told otherwise: zstd's default
// (3), LZ4's fast mode (0).
int default_level(FrameCodec codec);

// OK if `level` is one the codec has: zstd from its fastest negative level
// to 22 (0 meaning its default), LZ4 from 0 (fast) to 12 (high compression).
// kInvalidArgument saying the range otherwise.
Status check_level(FrameCodec codec, int level);

}  // namespace lazyblock
