#include "chunk/frame_codec.h"

#include <lz4frame.h>
#include <lz4hc.h>
// For ZSTD_d_stableOutBuffer (experimental in zstd's API; the library
// itself takes it since 1.4.4).
#define ZSTD_STATIC_LINKING_ONLY
#include <zstd.h>

#include <memory>

#include <fmt/format.h>

namespace lazyblock {

std::string_view frame_codec_name(FrameCodec codec) {
  return codec == FrameCodec::kZstd ? "zstd" : "lz4";
}

namespace {

// zstd decodes into the caller's buffer itself (a stable output buffer: no
// window of its own to copy out of); it keeps only a partial block of input.
class ZstdDecoder final : public FrameDecoder {
 public:
  explicit ZstdDecoder(ZSTD_DCtx* context) : context_(context, ZSTD_freeDCtx) {}

  Status begin(std::span<std::byte> out) override {
    ZSTD_DCtx_reset(context_.get(), ZSTD_reset_session_only);
    out_ = out;
    decoded_ = 0;
    ended_ = false;
    return Status::ok();
  }

  Status feed(std::span<const std::byte> stored) override {
    if (stored.empty()) return Status::ok();
    if (ended_) return trailing(stored.size());
    ZSTD_inBuffer in{stored.data(), stored.size(), 0};
    ZSTD_outBuffer out{out_.data(), out_.size(), decoded_};
    while (in.pos < in.size) {
      const size_t in_before = in.pos;
      const size_t out_before = out.pos;
      const size_t left = ZSTD_decompressStream(context_.get(), &out, &in);
      decoded_ = out.pos;
      if (ZSTD_isError(left)) {
        // Too small a destination means the frame holds more than promised.
        return Status::corruption(fmt::format("zstd frame: {}", ZSTD_getErrorName(left)));
      }
      if (left == 0) {
        ended_ = true;
        if (in.pos < in.size) return trailing(in.size - in.pos);
        break;
      }
      if (in.pos == in_before && out.pos == out_before) {
        return Status::corruption(
            fmt::format("zstd frame: it holds more than the {} bytes expected", out_.size()));
      }
    }
    return Status::ok();
  }

  uint64_t decoded() const override { return decoded_; }

  Status finish() override {
    if (!ended_) {
      return Status::corruption(fmt::format(
          "zstd frame: the stored bytes end before the frame does ({} of {} bytes decompressed)",
          decoded_, out_.size()));
    }
    if (decoded_ != out_.size()) {
      return Status::corruption(
          fmt::format("zstd frame: {} bytes decompressed, {} expected", decoded_, out_.size()));
    }
    return Status::ok();
  }

 private:
  // The frame must be exactly one frame: trailing bytes mean the table and
  // the data disagree.
  static Status trailing(uint64_t bytes) {
    return Status::corruption(
        fmt::format("zstd frame: {} stored bytes follow the frame's end", bytes));
  }

  const std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> context_;
  std::span<std::byte> out_;
  uint64_t decoded_ = 0;
  bool ended_ = false;
};

class Lz4Decoder final : public FrameDecoder {
 public:
  explicit Lz4Decoder(LZ4F_dctx* context) : context_(context, LZ4F_freeDecompressionContext) {}

  Status begin(std::span<std::byte> out) override {
    LZ4F_resetDecompressionContext(context_.get());
    out_ = out;
    decoded_ = 0;
    ended_ = false;
    return Status::ok();
  }

  Status feed(std::span<const std::byte> stored) override {
    size_t in_done = 0;
    while (in_done < stored.size()) {
      if (ended_) {
        return Status::corruption(fmt::format("lz4 frame: {} stored bytes follow the frame's end",
                                              stored.size() - in_done));
      }
      size_t in_size = stored.size() - in_done;
      size_t out_size = out_.size() - decoded_;
      const size_t hint = LZ4F_decompress(context_.get(), out_.data() + decoded_, &out_size,
                                          stored.data() + in_done, &in_size, nullptr);
      if (LZ4F_isError(hint)) {
        return Status::corruption(fmt::format("lz4 frame: {}", LZ4F_getErrorName(hint)));
      }
      in_done += in_size;
      decoded_ += out_size;
      if (hint == 0) ended_ = true;  // the frame's end, its checksum verified
      if (!ended_ && in_size == 0 && out_size == 0) {
        return Status::corruption(
            fmt::format("lz4 frame: it holds more than the {} bytes expected", out_.size()));
      }
    }
    return Status::ok();
  }

  uint64_t decoded() const override { return decoded_; }

  Status finish() override {
    // LZ4 may hold decoded bytes back until it is asked for them again.
    while (!ended_ && decoded_ < out_.size()) {
      const std::byte none{};
      size_t in_size = 0;
      size_t out_size = out_.size() - decoded_;
      const size_t hint = LZ4F_decompress(context_.get(), out_.data() + decoded_, &out_size, &none,
                                          &in_size, nullptr);
      if (LZ4F_isError(hint)) {
        return Status::corruption(fmt::format("lz4 frame: {}", LZ4F_getErrorName(hint)));
      }
      decoded_ += out_size;
      if (hint == 0) ended_ = true;
      if (out_size == 0) break;
    }
    if (!ended_) {
      return Status::corruption(fmt::format(
          "lz4 frame: the stored bytes end before the frame does ({} of {} bytes decompressed)",
          decoded_, out_.size()));
    }
    if (decoded_ != out_.size()) {
      return Status::corruption(
          fmt::format("lz4 frame: {} bytes decompressed, {} expected", decoded_, out_.size()));
    }
    return Status::ok();
  }

 private:
  const std::unique_ptr<LZ4F_dctx, decltype(&LZ4F_freeDecompressionContext)> context_;
  std::span<std::byte> out_;
  uint64_t decoded_ = 0;
  bool ended_ = false;
};

}  // namespace

Result<std::unique_ptr<FrameDecoder>> FrameDecoder::create(FrameCodec codec) {
  if (codec == FrameCodec::kZstd) {
    ZSTD_DCtx* context = ZSTD_createDCtx();
    if (context == nullptr) return Status::io_error("zstd: no decompression context");
    // Decoded straight into the caller's buffer, which stays put per frame.
    ZSTD_DCtx_setParameter(context, ZSTD_d_stableOutBuffer, 1);
    return std::unique_ptr<FrameDecoder>(new ZstdDecoder(context));
  }
  LZ4F_dctx* context = nullptr;
  if (LZ4F_isError(LZ4F_createDecompressionContext(&context, LZ4F_VERSION))) {
    return Status::io_error("lz4: no decompression context");
  }
  return std::unique_ptr<FrameDecoder>(new Lz4Decoder(context));
}

Status decompress_frame(FrameCodec codec, std::span<const std::byte> frame,
                        std::span<std::byte> out) {
  Result<std::unique_ptr<FrameDecoder>> decoder = FrameDecoder::create(codec);
  if (!decoder) return decoder.status();
  LB_RETURN_IF_ERROR((*decoder)->begin(out));
  LB_RETURN_IF_ERROR((*decoder)->feed(frame));
  return (*decoder)->finish();
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
