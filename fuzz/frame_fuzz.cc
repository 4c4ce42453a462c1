// libFuzzer target: the compressed-frame decoding path, zstd and LZ4, on
// arbitrary bytes fed in arbitrary splits, as a stream delivers them.
//
// An input is a frame's compressed bytes, a claimed uncompressed size and
// the splits to deliver them in, in one of two forms (bit 1 of byte 0):
//   raw:   the rest of the input is the stored frame, as it is;
//   built: the rest is plain bytes, which the target compresses itself
//          (compress_frame, so checksums are right) and then damages as
//          the input says (a byte flipped, the frame cut short, a size
//          claimed that is off): mutations reach past the frame header
//          instead of dying on the checksums.
// Layout: byte 0 flags (bit 0: LZ4, else zstd; bit 1: built), bytes 1-2
// the claimed size (raw) or its offset from the plain size (built, signed),
// byte 3 the largest piece of a split (2^(b % 18) bytes), bytes 4-7 the
// split's seed, bytes 8-12 the damage (built: flip position, flip mask,
// cut), then the payload.
//
// Checked, for every input:
// - FrameDecoder (the streaming decoder the frame chunker uses) never
//   reports more decoded bytes than claimed, and never fewer than before;
//   it verifies (finish() OK) only with exactly the claimed bytes, and its
//   verdict and bytes do not depend on the splits (the one-shot
//   decompress_frame gives the same); zstd's verdict and bytes agree with
//   libzstd's one-shot API; a built frame left undamaged verifies exactly
//   when the claimed size is the plain size, and then yields the plain
//   bytes; a decoder that failed decodes the next good frame right.
// - Through a FrameChunker over a store whose reads deliver the frame in
//   the same splits: a read of the frame succeeds exactly when the decoder
//   verifies, with the same bytes, and after a failed read nothing of the
//   frame is cached (cached_slice has none of it).
#include <zstd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
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
// Large enough for several LZ4 and zstd blocks, small enough to stay fast.
constexpr uint64_t kMaxClaimed = 256 * 1024;

// Piece sizes for delivering `total` bytes: from a seed, each at most
// `largest`.
std::vector<size_t> split_of(size_t total, uint32_t seed, size_t largest) {
  std::minstd_rand rng(seed | 1);
  std::vector<size_t> pieces;
  for (size_t done = 0; done < total;) {
    const size_t piece = std::min(total - done, 1 + rng() % largest);
    pieces.push_back(piece);
    done += piece;
  }
  return pieces;
}

struct Decoded {
  Status status;
  std::vector<std::byte> bytes;  // all `claimed` of them, whatever was decoded
};

// Feeds `stored` to `decoder` in `pieces`, each copied into a buffer of its
// own size, so that a read past a piece is caught.
Decoded decode_in_pieces(FrameDecoder& decoder, std::span<const std::byte> stored,
                         const std::vector<size_t>& pieces, uint64_t claimed) {
  Decoded result;
  // Exactly `claimed` bytes on the heap: a write past them is caught.
  auto out = std::make_unique<std::byte[]>(claimed);
  const std::span<std::byte> plain(out.get(), claimed);
  result.status = decoder.begin(plain);
  check(result.status.is_ok());
  uint64_t before = 0;
  size_t at = 0;
  for (size_t piece : pieces) {
    std::vector<std::byte> copy(stored.begin() + at, stored.begin() + at + piece);
    at += piece;
    result.status = decoder.feed(copy);
    check(decoder.decoded() >= before && decoder.decoded() <= claimed);
    before = decoder.decoded();
    if (!result.status.is_ok()) break;
  }
  if (result.status.is_ok()) result.status = decoder.finish();
  check(decoder.decoded() >= before && decoder.decoded() <= claimed);
  if (result.status.is_ok()) {
    check(decoder.decoded() == claimed);
  } else {
    check(result.status.code() == StatusCode::kCorruption);
  }
  result.bytes.assign(plain.begin(), plain.end());
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
  std::vector<std::byte> out(claimed);
  Result<size_t> got = (*chunker)->read_at(out, 0);
  check(got.is_ok() == decoded.status.is_ok());
  if (got.is_ok()) {
    check(*got == claimed && out == decoded.bytes);
    std::optional<std::span<const std::byte>> cached = (*chunker)->cached_slice(0, claimed);
    check(cached && std::equal(cached->begin(), cached->end(), decoded.bytes.begin()));
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
  if (ZSTD_isError(ZSTD_findFrameCompressedSize(stored.data(), stored.size())) ||
      ZSTD_findFrameCompressedSize(stored.data(), stored.size()) != stored.size()) {
    return false;
  }
  out.assign(claimed + 1, std::byte{0});
  const size_t n = ZSTD_decompress(out.data(), out.size(), stored.data(), stored.size());
  if (ZSTD_isError(n) || n != claimed) return false;
  out.resize(claimed);
  return true;
}

std::unique_ptr<FrameDecoder> make_decoder(FrameCodec codec) {
  Result<std::unique_ptr<FrameDecoder>> decoder = FrameDecoder::create(codec);
  check(decoder.is_ok());
  return std::move(decoder).value();
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
  const uint16_t size_field = static_cast<uint16_t>(data[1] | data[2] << 8);
  const size_t largest = size_t{1} << (data[3] % 18);
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
    claimed = size_field * uint64_t{4};  // up to 256 KiB
  } else {
    plain = rest.first(std::min<size_t>(rest.size(), kMaxClaimed));
    Result<std::vector<std::byte>> frame = compress_frame(codec, 1, plain);
    check(frame.is_ok());
    stored = std::move(frame).value();
    const int64_t claimed_offset = static_cast<int16_t>(size_field);
    claimed = static_cast<uint64_t>(
        std::clamp<int64_t>(static_cast<int64_t>(plain.size()) + claimed_offset, 0, kMaxClaimed));
    // The damage: a flip (mask 0: none) and a cut (0xff: none).
    const size_t flip_at = static_cast<size_t>(data[8] | data[9] << 8) % stored.size();
    const uint8_t mask = data[10];
    const uint16_t cut = static_cast<uint16_t>(data[11] | data[12] << 8);
    stored[flip_at] ^= std::byte{mask};
    if (cut != 0xffff) stored.resize(std::min<size_t>(stored.size(), cut));
    undamaged = mask == 0 && cut == 0xffff;
  }
  if (claimed == 0) claimed = 1;  // a frame holds at least one byte
  const std::vector<size_t> pieces = split_of(stored.size(), seed, largest);

  std::unique_ptr<FrameDecoder> decoder = make_decoder(codec);
  const Decoded streamed = decode_in_pieces(*decoder, stored, pieces, claimed);

  // The verdict and bytes of one piece, through a fresh decoder.
  std::vector<std::byte> whole(claimed);
  const Status one_shot = decompress_frame(codec, stored, whole);
  check(one_shot.is_ok() == streamed.status.is_ok());
  if (one_shot.is_ok()) check(whole == streamed.bytes);

  if (codec == FrameCodec::kZstd) {
    std::vector<std::byte> reference;
    const bool verifies = zstd_one_shot(stored, claimed, reference);
    check(verifies == streamed.status.is_ok());
    if (verifies) check(reference == streamed.bytes);
  }
  if (built && undamaged) {
    const bool fits = claimed == plain.size();
    check(streamed.status.is_ok() == fits);
    if (fits) check(std::equal(plain.begin(), plain.end(), streamed.bytes.begin()));
  }

  // The same decoder, whatever became of its last frame, decodes a good one.
  static const std::vector<std::byte> kGoodPlain = [] {
    std::vector<std::byte> bytes(10000);
    for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::byte(i * 7 % 251);
    return bytes;
  }();
  const Result<std::vector<std::byte>> good = compress_frame(codec, 1, kGoodPlain);
  check(good.is_ok());
  const Decoded again =
      decode_in_pieces(*decoder, *good, split_of(good->size(), seed, largest), kGoodPlain.size());
  check(again.status.is_ok() && again.bytes == kGoodPlain);

  check_chunker(codec, stored, pieces, claimed, streamed);
  return 0;
}
