// Writes frame_fuzz's seed corpus into the directory given: for each codec,
// inputs of both forms (see frame_fuzz.cc) that verify, in whole and in
// split deliveries, so that mutations start from frames that decode. Run by
// the fuzz build after frame_fuzz is linked (no binary seeds are kept in
// the tree).
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "chunk/frame_codec.h"

namespace {

using lazyblock::FrameCodec;

// Memory-like bytes: runs of zeros, a repeated text, a counter.
std::vector<std::byte> plain_bytes(size_t size) {
  const std::string text = "lazyblock serves VM snapshots from object storage. ";
  std::vector<std::byte> bytes(size);
  for (size_t i = 0; i < size; ++i) {
    const size_t part = i / 4096 % 3;
    bytes[i] = part == 0   ? std::byte{0}
               : part == 1 ? std::byte(text[i % text.size()])
                           : std::byte(static_cast<uint8_t>(i * 2654435761u >> 13));
  }
  return bytes;
}

// The 13 bytes before the payload: flags, the size field, the largest
// piece's exponent and the built frame's blocks, the split seed, no damage.
std::vector<std::byte> prefix(FrameCodec codec, bool built, uint16_t size_field, uint8_t piece,
                              uint8_t blocks = 0, bool linked = false) {
  const uint8_t flags = (codec == FrameCodec::kLz4 ? 1 : 0) | (built ? 2 : 0) | (linked ? 4 : 0);
  const uint8_t bytes[13] = {flags,
                             static_cast<uint8_t>(size_field),
                             static_cast<uint8_t>(size_field >> 8),
                             static_cast<uint8_t>(piece | blocks << 5),
                             1,
                             2,
                             3,
                             4,
                             0,
                             0,
                             0,
                             0xff,
                             0xff};
  std::vector<std::byte> out;
  for (uint8_t b : bytes) out.push_back(std::byte{b});
  return out;
}

bool write(const std::string& path, const std::vector<std::byte>& bytes) {
  std::ofstream file(path, std::ios::binary | std::ios::trunc);
  file.write(reinterpret_cast<const char*>(bytes.data()),
             static_cast<std::streamsize>(bytes.size()));
  return static_cast<bool>(file);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  int written = 0;
  for (FrameCodec codec : {FrameCodec::kZstd, FrameCodec::kLz4}) {
    const std::string name(lazyblock::frame_codec_name(codec));
    for (size_t size : {size_t{64}, size_t{4096}, size_t{65536}}) {
      const std::vector<std::byte> plain = plain_bytes(size);
      for (uint8_t piece : {uint8_t{0}, uint8_t{7}, uint8_t{16}}) {
        // Built: the plain bytes, compressed by the target.
        std::vector<std::byte> built = prefix(codec, true, 0, piece);
        built.insert(built.end(), plain.begin(), plain.end());
        // Raw: the frame itself, claiming its size (less one, as raw claims).
        lazyblock::Result<std::vector<std::byte>> frame =
            lazyblock::compress_frame(codec, 1, plain);
        if (!frame) {
          std::fprintf(stderr, "%s\n", frame.status().to_string().c_str());
          return 1;
        }
        std::vector<std::byte> raw = prefix(codec, false, static_cast<uint16_t>(size - 1), piece);
        raw.insert(raw.end(), frame->begin(), frame->end());
        const std::string stem =
            dir + "/" + name + "-" + std::to_string(size) + "-p" + std::to_string(piece);
        if (!write(stem + "-built", built) || !write(stem + "-raw", raw)) {
          std::fprintf(stderr, "cannot write seeds in %s\n", dir.c_str());
          return 1;
        }
        written += 2;
      }
      // Built in blocks of 2 KiB (independent, and for LZ4 linked too),
      // as other writers may cut a frame.
      for (bool linked : {false, true}) {
        if (linked && codec != FrameCodec::kLz4) continue;
        std::vector<std::byte> blocky = prefix(codec, true, 0, 7, 3, linked);
        blocky.insert(blocky.end(), plain.begin(), plain.end());
        const std::string path = dir + "/" + name + "-" + std::to_string(size) + "-blocks" +
                                 (linked ? "-linked" : "") + "-built";
        if (!write(path, blocky)) {
          std::fprintf(stderr, "cannot write seeds in %s\n", dir.c_str());
          return 1;
        }
        ++written;
      }
    }
  }
  std::printf("frame_fuzz_seeds: %d seeds in %s\n", written, dir.c_str());
  return 0;
}
