#include "chunk/frame_codec.h"

#include <lz4frame.h>
#include <lz4hc.h>
#include <zstd.h>

#include <memory>

#include <fmt/format.h>

namespace lazyblock {

std::string_view frame_codec_name(FrameCodec codec) {
  return codec == FrameCodec::kZstd ? "zstd" : "lz4";
}

namespace {

Status decompress_zstd(std::span<const std::byte> frame, std::span<std::byte> out) {
  // The frame must be exactly one frame: trailing bytes mean the table and
  // the data disagree.
  const size_t frame_size = ZSTD_findFrameCompressedSize(frame.data(), frame.size());
  if (ZSTD_isError(frame_size)) {
    return Status::corruption(fmt::format("zstd frame: {}", ZSTD_getErrorName(frame_size)));
  }
  if (frame_size != frame.size()) {
    return Status::corruption(fmt::format("zstd frame: {} bytes of frame in {} stored bytes",
                                          frame_size, frame.size()));
  }
  const size_t got = ZSTD_decompress(out.data(), out.size(), frame.data(), frame.size());
  if (ZSTD_isError(got)) {
    // Too small a destination means the frame holds more than promised.
    return Status::corruption(fmt::format("zstd frame: {}", ZSTD_getErrorName(got)));
  }
  if (got != out.size()) {
    return Status::corruption(
        fmt::format("zstd frame: {} bytes decompressed, {} expected", got, out.size()));
  }
  return Status::ok();
}

Status decompress_lz4(std::span<const std::byte> frame, std::span<std::byte> out) {
  LZ4F_dctx* raw = nullptr;
  if (LZ4F_isError(LZ4F_createDecompressionContext(&raw, LZ4F_VERSION))) {
    return Status::io_error("lz4: no decompression context");
  }
  const std::unique_ptr<LZ4F_dctx, decltype(&LZ4F_freeDecompressionContext)> context(
      raw, LZ4F_freeDecompressionContext);
  size_t in_done = 0, out_done = 0;
  for (;;) {
    size_t in_size = frame.size() - in_done;
    size_t out_size = out.size() - out_done;
    const size_t hint = LZ4F_decompress(context.get(), out.data() + out_done, &out_size,
                                        frame.data() + in_done, &in_size, nullptr);
    if (LZ4F_isError(hint)) {
      return Status::corruption(fmt::format("lz4 frame: {}", LZ4F_getErrorName(hint)));
    }
    in_done += in_size;
    out_done += out_size;
    if (hint == 0) break;  // the frame's end, its checksum verified
    if (in_size == 0 && out_size == 0) {
      return Status::corruption(fmt::format(
          "lz4 frame: {} bytes decompressed, {} expected, and the frame does not end",
          out_done, out.size()));
    }
  }
  if (in_done != frame.size()) {
    return Status::corruption(
        fmt::format("lz4 frame: it ends after {} of {} stored bytes", in_done, frame.size()));
  }
  if (out_done != out.size()) {
    return Status::corruption(
        fmt::format("lz4 frame: {} bytes decompressed, {} expected", out_done, out.size()));
  }
  return Status::ok();
}

}  // namespace

Status decompress_frame(FrameCodec codec, std::span<const std::byte> frame,
                        std::span<std::byte> out) {
  return codec == FrameCodec::kZstd ? decompress_zstd(frame, out) : decompress_lz4(frame, out);
}

Result<std::vector<std::byte>> compress_frame(FrameCodec codec, int level,
                                              std::span<const std::byte> data) {
  if (codec == FrameCodec::kZstd) {
    std::vector<std::byte> out(ZSTD_compressBound(data.size()));
    const std::unique_ptr<ZSTD_CCtx, decltype(&ZSTD_freeCCtx)> context(ZSTD_createCCtx(),
                                                                       ZSTD_freeCCtx);
    ZSTD_CCtx_setParameter(context.get(), ZSTD_c_compressionLevel, level);
    ZSTD_CCtx_setParameter(context.get(), ZSTD_c_checksumFlag, 1);
    const size_t size =
        ZSTD_compress2(context.get(), out.data(), out.size(), data.data(), data.size());
    if (ZSTD_isError(size)) {
      return Status::io_error(fmt::format("zstd: {}", ZSTD_getErrorName(size)));
    }
    out.resize(size);
    return out;
  }
  LZ4F_preferences_t preferences{};
  preferences.frameInfo.blockSizeID = LZ4F_max4MB;
  preferences.frameInfo.blockMode = LZ4F_blockIndependent;
  preferences.frameInfo.blockChecksumFlag = LZ4F_blockChecksumEnabled;
  preferences.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
  preferences.frameInfo.contentSize = data.size();
  preferences.compressionLevel = level;
  std::vector<std::byte> out(LZ4F_compressFrameBound(data.size(), &preferences));
  const size_t size =
      LZ4F_compressFrame(out.data(), out.size(), data.data(), data.size(), &preferences);
  if (LZ4F_isError(size)) return Status::io_error(fmt::format("lz4: {}", LZ4F_getErrorName(size)));
  out.resize(size);
  return out;
}

int default_level(FrameCodec codec) { return codec == FrameCodec::kZstd ? ZSTD_CLEVEL_DEFAULT : 0; }

Status check_level(FrameCodec codec, int level) {
  const int lowest = codec == FrameCodec::kZstd ? ZSTD_minCLevel() : 0;
  const int highest = codec == FrameCodec::kZstd ? ZSTD_maxCLevel() : LZ4HC_CLEVEL_MAX;
  if (level < lowest || level > highest) {
    return Status::invalid_argument(fmt::format("{} compresses at levels {} to {}, not {}",
                                                frame_codec_name(codec), lowest, highest, level));
  }
  return Status::ok();
}

}  // namespace lazyblock
