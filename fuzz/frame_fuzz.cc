// libFuzzer target: the compressed-frame decoding path, zstd and LZ4, on
// arbitrary bytes fed in arbitrary splits, as a stream delivers them.
//
// An input is a frame's compressed bytes, a claimed uncompressed size and
// the splits to deliver them in, in one of two forms (bit 1 of byte 0):
//   raw:   the rest of the input is the stored frame, as it is;
//   built: the rest is plain bytes, which the target compresses itself
//          (checksums right) and then damages as the input says (a byte
//          flipped, the frame cut short, a size claimed that is off):
//          mutations reach past the frame header instead of dying on the
//          checksums.
// Layout: byte 0 flags (bit 0: LZ4, else zstd; bit 1: built; bit 2: built
// LZ4 blocks linked, else independent), bytes 1-2 the claimed size less
// one (raw) or its offset from the plain size (built, signed), byte 3 the
// largest piece of a split (2^(b % 17) bytes, bits 0-4) and the built
// frame's blocks (bits 5-7: 0, compress_frame's, as lazyblock writes them;
// k, a block every 2^(8 + k) plain bytes, as other writers may cut them),
// bytes 4-7 the split's seed, bytes 8-12 the damage (built: flip position,
// flip mask, cut), then the payload.
//
// Sizes are kept small for speed (make fuzz gives each target ~15 s of
// CPU): frames of up to kMaxClaimed bytes, delivered in at most about
// kMaxPieces pieces.
//
// Checked, for every input, with one fresh decoder (so that a verdict
// depends on the input alone) decoding three frames in a row:
// - FrameDecoder (the streaming decoder the frame chunker uses) never
//   reports more decoded bytes than claimed, and never fewer than before;
//   it verifies (finish() OK) only with exactly the claimed bytes, and its
//   verdict and bytes do not depend on the splits (the frame again, in one
//   piece, gives the same); zstd's verdict and bytes agree with libzstd's
//   one-shot API; a built frame left undamaged verifies exactly when the
//   claimed size is the plain size, and then yields the plain bytes; the
//   decoder, whatever became of those frames, decodes a good one right.
// - No read past a piece it is fed, nor of a piece after feed() returned
//   (see PoisonedPieces), nor a write past the claimed bytes.
// Checked for one input in kChunkerEvery, chosen by a hash of the input (so
// the same input always is; a FrameChunker costs a cache file, its map and
// a fetch thread, several times all the rest):
// - The one-shot decompress_frame (inspect --verify's) gives the same
//   verdict and bytes.
// - Through a FrameChunker over a store whose reads deliver the frame in
//   the same splits: a read of the frame succeeds exactly when the decoder
//   verifies, with the same bytes, and after a failed read nothing of the
//   frame is cached (cached_slice has none of it).
#include <lz4frame.h>
#include <sanitizer/asan_interface.h>
#include <zstd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "chunk/frame_chunker.h"
#include "chunk/frame_codec.h"
#include "common/log.h"
#include "storage/object_store.h"
#include "testing/scratch_dir.h"

namespace {

using namespace lazyblock;

void check(bool condition) {
  if (!condition) std::abort();
}

constexpr size_t kPrefix = 13;
// Large enough for frames of many blocks (built ones are cut into blocks of
// 512 bytes and up), small enough that no buffer of a frame's size leaves
// the sanitizer's fast allocator (above 128 KiB each is an mmap).
constexpr uint64_t kMaxClaimed = 64 * 1024;
// Pieces per delivery: every byte its own piece in a frame of up to this
// many bytes; runs of small pieces at chosen places in larger ones.
constexpr size_t kMaxPieces = 256;
constexpr size_t kRuns = 4;
constexpr size_t kChunkerEvery = 32;

// Piece sizes for delivering `total` bytes, from a seed: pieces of 1 to
// `largest` bytes throughout if about kMaxPieces of them cover `total`;
// otherwise kRuns runs of such pieces (at the start, up to the end, and at
// two places the seed picks) with long pieces between them. At most
// kMaxPieces + 1 pieces either way.
std::vector<size_t> split_of(size_t total, uint32_t seed, size_t largest) {
  std::minstd_rand rng(seed | 1);
  std::vector<size_t> cuts;  // inside (0, total)
  cuts.reserve(kMaxPieces + 1);
  const auto step = [&] { return 1 + rng() % largest; };
  if (total / ((largest + 1) / 2) < kMaxPieces) {
    for (size_t at = step(); at < total && cuts.size() < kMaxPieces; at += step()) {
      cuts.push_back(at);
    }
  } else {
    const size_t per_run = kMaxPieces / kRuns;
    for (size_t run = 0; run < kRuns; ++run) {
      if (run == 1) {  // backwards from the end
        size_t at = total;
        for (size_t i = 0; i < per_run; ++i) {
          const size_t back = step();
          if (back >= at) break;
          at -= back;
          cuts.push_back(at);
        }
        continue;
      }
      size_t at = run == 0 ? 0 : rng() % total;
      for (size_t i = 0; i < per_run; ++i) {
        at += step();
        if (at >= total) break;
        cuts.push_back(at);
      }
    }
    std::sort(cuts.begin(), cuts.end());
    cuts.erase(std::unique(cuts.begin(), cuts.end()), cuts.end());
  }
  std::vector<size_t> pieces;
  pieces.reserve(cuts.size() + 1);
  size_t from = 0;
  for (size_t cut : cuts) {
    pieces.push_back(cut - from);
    from = cut;
  }
  if (from < total) pieces.push_back(total - from);
  return pieces;
}

// The same bytes (memcmp: std::equal over std::byte is a loop, traced
// compare by compare under the fuzzer's instrumentation).
bool same(std::span<const std::byte> a, std::span<const std::byte> b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size()) == 0);
}

// Uninitialised bytes on the heap, exactly `size` of them (a write past
// them is caught): most frames fail early and decode little of them, so
// zeroing them would be most of the work.
std::unique_ptr<std::byte[]> buffer_of(uint64_t size) {
  return std::make_unique_for_overwrite<std::byte[]>(size);
}

struct Decoded {
  Status status;
  std::unique_ptr<std::byte[]> out;  // `claimed` bytes, decoded into
  std::span<const std::byte> bytes;  // all of out if it verified, else none
};

// The stored bytes of a frame laid out in one allocation for delivery in
// `pieces`, each at a multiple of the sanitizer's 8-byte granule and
// followed by at least kGap poisoned bytes: a read past a piece is caught
// as if each were an allocation of its own (one copy of the frame fed in
// subspans would hide it, the next piece's bytes being valid memory), for
// one allocation instead of one per piece. A piece is poisoned once fed, as
// the frame chunker reuses its buffer for the next read: a decoder that
// kept a pointer into it is caught too.
class PoisonedPieces {
 public:
  static constexpr size_t kGap = 16;

  PoisonedPieces(std::span<const std::byte> stored, const std::vector<size_t>& pieces) {
    for (size_t piece : pieces) size_ += round_up(piece) + kGap;
    buffer_ = buffer_of(size_);
    ASAN_POISON_MEMORY_REGION(buffer_.get(), size_);
    size_t at = 0;
    size_t from = 0;
    spans_.reserve(pieces.size());
    for (size_t piece : pieces) {
      std::byte* start = buffer_.get() + at;
      ASAN_UNPOISON_MEMORY_REGION(start, piece);
      std::memcpy(start, stored.data() + from, piece);
      spans_.emplace_back(start, piece);
      at += round_up(piece) + kGap;
      from += piece;
    }
  }
  PoisonedPieces(const PoisonedPieces&) = delete;
  PoisonedPieces& operator=(const PoisonedPieces&) = delete;
  ~PoisonedPieces() { ASAN_UNPOISON_MEMORY_REGION(buffer_.get(), size_); }

  size_t size() const { return spans_.size(); }
  std::span<const std::byte> operator[](size_t i) const { return spans_[i]; }
  void retire(size_t i) { ASAN_POISON_MEMORY_REGION(spans_[i].data(), spans_[i].size()); }

 private:
  static size_t round_up(size_t n) { return (n + 7) / 8 * 8; }

  size_t size_ = 0;
  std::unique_ptr<std::byte[]> buffer_;
  std::vector<std::span<const std::byte>> spans_;
};

// Feeds `stored` to `decoder` in `pieces` (laid out as PoisonedPieces).
Decoded decode_in_pieces(FrameDecoder& decoder, std::span<const std::byte> stored,
                         const std::vector<size_t>& pieces, uint64_t claimed) {
  Decoded result;
  result.out = buffer_of(claimed);
  const std::span<std::byte> plain(result.out.get(), claimed);
  result.status = decoder.begin(plain);
  check(result.status.is_ok());
  PoisonedPieces laid_out(stored, pieces);
  uint64_t before = 0;
  for (size_t i = 0; i < laid_out.size(); ++i) {
    result.status = decoder.feed(laid_out[i]);
    laid_out.retire(i);
    check(decoder.decoded() >= before && decoder.decoded() <= claimed);
    before = decoder.decoded();
    if (!result.status.is_ok()) break;
  }
  if (result.status.is_ok()) result.status = decoder.finish();
  check(decoder.decoded() >= before && decoder.decoded() <= claimed);
  if (result.status.is_ok()) {
    check(decoder.decoded() == claimed);
    result.bytes = plain;
  } else {
    check(result.status.code() == StatusCode::kCorruption);
  }
  return result;
}

// An object store of one object whose range reads deliver their bytes in
// the pieces given.
class SplittingStore final : public ObjectStore {
 public:
  SplittingStore(std::vector<std::byte> object, std::vector<size_t> pieces)
      : object_(std::move(object)), pieces_(std::move(pieces)) {}

  Result<uint64_t> stat(const std::string&, const IoContext&) override { return object_.size(); }
  Result<std::unique_ptr<RangeReader>> open_range(const std::string&, uint64_t offset,
                                                  uint64_t length, const IoContext&) override {
    if (offset > object_.size()) return Status::out_of_range("past the end");
    const uint64_t clipped = std::min<uint64_t>(length, object_.size() - offset);
    return std::unique_ptr<RangeReader>(
        new Reader(std::span(object_).subspan(offset, clipped), pieces_, object_.size()));
  }
  Status put(const std::string&, std::span<const std::byte>, const IoContext&) override {
    return Status::invalid_argument("read-only");
  }
  Status remove(const std::string&, const IoContext&) override {
    return Status::invalid_argument("read-only");
  }
  std::string describe() const override { return "splitting-store"; }

 private:
  class Reader final : public RangeReader {
   public:
    Reader(std::span<const std::byte> range, const std::vector<size_t>& pieces, uint64_t size)
        : range_(range), pieces_(pieces), size_(size) {}
    Result<size_t> read(std::span<std::byte> buffer) override {
      if (done_ == range_.size()) return size_t{0};
      size_t want = next_ < pieces_.size() ? pieces_[next_++] : range_.size() - done_;
      want = std::min({want, buffer.size(), range_.size() - done_});
      std::memcpy(buffer.data(), range_.data() + done_, want);
      done_ += want;
      return want;
    }
    uint64_t object_size() const override { return size_; }
    uint64_t range_length() const override { return range_.size(); }

   private:
    const std::span<const std::byte> range_;
    const std::vector<size_t>& pieces_;
    const uint64_t size_;
    size_t next_ = 0;
    size_t done_ = 0;
  };

  const std::vector<std::byte> object_;
  const std::vector<size_t> pieces_;
};

// The frame read through a FrameChunker over a store that delivers it in
// `pieces`: must agree with the decoder's verdict and bytes, and cache
// nothing of a frame that fails.
void check_chunker(FrameCodec codec, const std::vector<std::byte>& stored,
                   const std::vector<size_t>& pieces, uint64_t claimed, const Decoded& decoded) {
  static const Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
  check(scratch.is_ok());
  ChunkerOptions options;
  options.cache_dir = scratch->path();
  options.readahead = false;
  FrameGeometry geometry;
  geometry.codec = codec;
  geometry.frames.push_back({0, claimed, 0, stored.size()});
  auto store = std::make_shared<SplittingStore>(stored, pieces);
  Result<std::unique_ptr<Chunker>> chunker =
      make_frame_chunker(store, "frames", std::move(geometry), options);
  if (stored.empty()) {
    // A frame of no stored bytes: its table is refused.
    check(!chunker && chunker.status().code() == StatusCode::kCorruption);
    return;
  }
  check(chunker.is_ok());
  const std::unique_ptr<std::byte[]> out = buffer_of(claimed);
  Result<size_t> got = (*chunker)->read_at(std::span(out.get(), claimed), 0);
  check(got.is_ok() == decoded.status.is_ok());
  if (got.is_ok()) {
    check(*got == claimed && same(std::span(out.get(), claimed), decoded.bytes));
    std::optional<std::span<const std::byte>> cached = (*chunker)->cached_slice(0, claimed);
    check(cached && same(*cached, decoded.bytes));
  } else {
    check(got.status().code() == StatusCode::kCorruption);
    for (uint64_t block = 0; block < claimed; block += options.block_size) {
      check(!(*chunker)->cached_slice(block, 1));
    }
  }
}

// libzstd's one-shot verdict: exactly one frame, holding exactly `claimed`
// bytes, which it puts in `out`.
bool zstd_one_shot(std::span<const std::byte> stored, uint64_t claimed,
                   std::vector<std::byte>& out) {
  // Kept from input to input (a fresh one is 200 KiB to allocate): the
  // reference, not what is under test, and reset by each frame it decodes.
  static ZSTD_DCtx* const context = ZSTD_createDCtx();
  check(context != nullptr);
  if (ZSTD_isError(ZSTD_findFrameCompressedSize(stored.data(), stored.size())) ||
      ZSTD_findFrameCompressedSize(stored.data(), stored.size()) != stored.size()) {
    return false;
  }
  out.assign(claimed + 1, std::byte{0});
  const size_t n =
      ZSTD_decompressDCtx(context, out.data(), out.size(), stored.data(), stored.size());
  if (ZSTD_isError(n) || n != claimed) return false;
  out.resize(claimed);
  return true;
}

// A zstd frame of `plain` (level 1, its size and checksum recorded, as
// compress_frame writes) with a block ended every `block` bytes.
std::vector<std::byte> zstd_in_blocks(std::span<const std::byte> plain, size_t block) {
  // Kept from input to input: compression does not depend on what the
  // context compressed before.
  static ZSTD_CCtx* const context = ZSTD_createCCtx();
  check(context != nullptr);
  ZSTD_CCtx_reset(context, ZSTD_reset_session_and_parameters);
  ZSTD_CCtx_setParameter(context, ZSTD_c_compressionLevel, 1);
  ZSTD_CCtx_setParameter(context, ZSTD_c_checksumFlag, 1);
  ZSTD_CCtx_setPledgedSrcSize(context, plain.size());
  std::vector<std::byte> out(ZSTD_compressBound(plain.size()) + 8 * (plain.size() / block + 2));
  ZSTD_outBuffer output{out.data(), out.size(), 0};
  for (size_t at = 0;; at += block) {
    const size_t n = std::min(block, plain.size() - at);
    ZSTD_inBuffer input{plain.data() + at, n, 0};
    const ZSTD_EndDirective mode = at + n == plain.size() ? ZSTD_e_end : ZSTD_e_flush;
    size_t left = 0;
    do {
      left = ZSTD_compressStream2(context, &output, &input, mode);
      check(!ZSTD_isError(left) && output.pos < output.size);
    } while (left != 0);
    if (mode == ZSTD_e_end) break;
  }
  out.resize(output.pos);
  return out;
}

// An LZ4 frame of `plain` (its size and checksums recorded) with a block
// ended every `block` bytes, linked or independent.
std::vector<std::byte> lz4_in_blocks(std::span<const std::byte> plain, size_t block, bool linked) {
  static LZ4F_cctx* const context = [] {
    LZ4F_cctx* made = nullptr;
    check(!LZ4F_isError(LZ4F_createCompressionContext(&made, LZ4F_VERSION)));
    return made;
  }();
  LZ4F_preferences_t preferences{};
  preferences.frameInfo.blockSizeID = LZ4F_max64KB;
  preferences.frameInfo.blockMode = linked ? LZ4F_blockLinked : LZ4F_blockIndependent;
  preferences.frameInfo.blockChecksumFlag = LZ4F_blockChecksumEnabled;
  preferences.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled;
  preferences.frameInfo.contentSize = plain.size();
  // Each update written out at once as a block of its own: nothing is
  // buffered, so the bound of an update is that of its bytes alone.
  preferences.autoFlush = 1;
  size_t bound = LZ4F_HEADER_SIZE_MAX + LZ4F_compressBound(0, &preferences);
  for (size_t at = 0; at < plain.size(); at += block) {
    bound += LZ4F_compressBound(std::min(block, plain.size() - at), &preferences);
  }
  std::vector<std::byte> out(bound);
  size_t size = LZ4F_compressBegin(context, out.data(), out.size(), &preferences);
  check(!LZ4F_isError(size));
  for (size_t at = 0; at < plain.size(); at += block) {
    const size_t n = std::min(block, plain.size() - at);
    const size_t wrote = LZ4F_compressUpdate(context, out.data() + size, out.size() - size,
                                             plain.data() + at, n, nullptr);
    check(!LZ4F_isError(wrote));
    size += wrote;
  }
  const size_t wrote = LZ4F_compressEnd(context, out.data() + size, out.size() - size, nullptr);
  check(!LZ4F_isError(wrote));
  out.resize(size + wrote);
  return out;
}

// The frame of `plain` a built input asks for: compress_frame's (block 0)
// or one cut into blocks of `block` bytes.
std::vector<std::byte> build_frame(FrameCodec codec, std::span<const std::byte> plain, size_t block,
                                   bool linked) {
  if (block == 0 || plain.empty()) {
    Result<std::vector<std::byte>> frame = compress_frame(codec, 1, plain);
    check(frame.is_ok());
    return std::move(frame).value();
  }
  return codec == FrameCodec::kZstd ? zstd_in_blocks(plain, block)
                                    : lz4_in_blocks(plain, block, linked);
}

std::unique_ptr<FrameDecoder> make_decoder(FrameCodec codec) {
  Result<std::unique_ptr<FrameDecoder>> decoder = FrameDecoder::create(codec);
  check(decoder.is_ok());
  return std::move(decoder).value();
}

// A good frame of 10000 bytes per codec, in blocks of 4 KiB, for the
// decoder to decode after whatever the input's frame did to it. (Not
// compress_frame's: its LZ4 frames declare 4 MiB blocks, for which a fresh
// LZ4 context allocates 8 MiB, outside the sanitizer's fast allocator.)
const std::vector<std::byte>& good_plain() {
  static const std::vector<std::byte> bytes = [] {
    std::vector<std::byte> made(10000);
    for (size_t i = 0; i < made.size(); ++i) made[i] = std::byte(i * 7 % 251);
    return made;
  }();
  return bytes;
}

const std::vector<std::byte>& good_frame(FrameCodec codec) {
  static const std::vector<std::byte> zstd =
      build_frame(FrameCodec::kZstd, good_plain(), 4096, false);
  static const std::vector<std::byte> lz4 =
      build_frame(FrameCodec::kLz4, good_plain(), 4096, false);
  return codec == FrameCodec::kZstd ? zstd : lz4;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  set_log_level(LogLevel::kOff);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < kPrefix) return 0;
  const FrameCodec codec = data[0] & 1 ? FrameCodec::kLz4 : FrameCodec::kZstd;
  const bool built = data[0] & 2;
  const bool linked = data[0] & 4;
  const uint16_t size_field = static_cast<uint16_t>(data[1] | data[2] << 8);
  const size_t largest = size_t{1} << ((data[3] & 31) % 17);
  const size_t block_exponent = data[3] >> 5;
  const size_t block = block_exponent == 0 ? 0 : size_t{1} << (8 + block_exponent);
  const uint32_t seed = static_cast<uint32_t>(data[4] | data[5] << 8 | data[6] << 16) |
                        static_cast<uint32_t>(data[7]) << 24;
  const auto* payload = reinterpret_cast<const std::byte*>(data + kPrefix);
  const std::span<const std::byte> rest(payload, size - kPrefix);

  std::vector<std::byte> stored;
  uint64_t claimed = 0;
  bool undamaged = false;
  std::span<const std::byte> plain;
  if (!built) {
    stored.assign(rest.begin(), rest.end());
    claimed = size_field + uint64_t{1};  // 1 to kMaxClaimed
  } else {
    plain = rest.first(std::min<size_t>(rest.size(), kMaxClaimed));
    stored = build_frame(codec, plain, block, linked);
    const int64_t claimed_offset = static_cast<int16_t>(size_field);
    claimed = static_cast<uint64_t>(
        std::clamp<int64_t>(static_cast<int64_t>(plain.size()) + claimed_offset, 1, kMaxClaimed));
    // The damage: a flip (mask 0: none) and a cut (0xffff: none).
    const size_t flip_at = static_cast<size_t>(data[8] | data[9] << 8) % stored.size();
    const uint8_t mask = data[10];
    const uint16_t cut = static_cast<uint16_t>(data[11] | data[12] << 8);
    stored[flip_at] ^= std::byte{mask};
    if (cut != 0xffff) stored.resize(std::min<size_t>(stored.size(), cut));
    undamaged = mask == 0 && cut == 0xffff;
  }
  const std::vector<size_t> pieces = split_of(stored.size(), seed, largest);

  std::unique_ptr<FrameDecoder> decoder = make_decoder(codec);
  const Decoded streamed = decode_in_pieces(*decoder, stored, pieces, claimed);

  // The same frame in one piece: the same verdict and bytes.
  const std::vector<size_t> one_piece =
      stored.empty() ? std::vector<size_t>() : std::vector<size_t>{stored.size()};
  const Decoded whole = decode_in_pieces(*decoder, stored, one_piece, claimed);
  check(whole.status.is_ok() == streamed.status.is_ok() && same(whole.bytes, streamed.bytes));

  if (codec == FrameCodec::kZstd) {
    std::vector<std::byte> reference;
    const bool verifies = zstd_one_shot(stored, claimed, reference);
    check(verifies == streamed.status.is_ok());
    if (verifies) check(same(reference, streamed.bytes));
  }
  if (built && undamaged) {
    const bool fits = claimed == plain.size();
    check(streamed.status.is_ok() == fits);
    if (fits) check(same(plain, streamed.bytes));
  }

  // The same decoder, whatever became of its last frames, decodes a good one.
  const std::vector<std::byte>& good = good_frame(codec);
  // (In at most about 32 pieces: its splits are not what this is about.)
  const Decoded again = decode_in_pieces(
      *decoder, good, split_of(good.size(), seed, std::max(largest, good.size() / 16)),
      good_plain().size());
  check(again.status.is_ok() && same(again.bytes, good_plain()));

  const std::string_view input(reinterpret_cast<const char*>(data), size);
  if (std::hash<std::string_view>{}(input) % kChunkerEvery == 0) {
    // The one-shot decompress_frame, a fresh decoder of its own.
    const std::unique_ptr<std::byte[]> out = buffer_of(claimed);
    const Status one_shot = decompress_frame(codec, stored, std::span(out.get(), claimed));
    check(one_shot.is_ok() == streamed.status.is_ok());
    if (one_shot.is_ok()) check(same(std::span(out.get(), claimed), streamed.bytes));
    check_chunker(codec, stored, pieces, claimed, streamed);
  }
  return 0;
}
