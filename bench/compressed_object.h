// A compressed object for `bench fetch --compressed` and `bench seq
// --compressed`: a memory-like image (testing/memory_image.h) cut into
// frames and compressed as `pack --compress` does (image::DataFileWriter),
// written into a file store's directory, with what the reports need beside
// the measured figures: its frame geometry, its compression ratio and the
// decompression speed of one core over its frames.
//
// The image is made in pieces of 16 MiB, each from its own seed, so that an
// object of any size is written and checked without holding it whole.
#pragma once

#include <cstdint>
#include <filesystem>
#include <span>
#include <vector>

#include "chunk/frame_chunker.h"
#include "common/byte_sink.h"
#include "common/status.h"

namespace lazyblock {

struct CompressedObject {
  FrameGeometry geometry;
  uint64_t size = 0;                       // uncompressed bytes
  uint64_t stored_bytes = 0;               // compressed bytes: the object's size
  double decompress_bytes_per_second = 0;  // one core, over a sample of its frames

  double ratio() const { return static_cast<double>(size) / static_cast<double>(stored_bytes); }
  // The seconds one core takes to decompress frame `index`, at the
  // measured speed.
  double decompress_seconds(size_t index) const {
    return static_cast<double>(geometry.frames[index].size) / decompress_bytes_per_second;
  }
};

// Writes the compressed object of the memory-like image of `size` bytes
// (from `seed`) to `path`, in frames of 2 MiB.
Result<CompressedObject> write_compressed_object(const std::filesystem::path& path, uint64_t size,
                                                 FrameCodec codec, uint64_t seed);

// The uncompressed bytes per second that `threads` threads deliver at once,
// measured now, each decoding frames of the object at `path` (its stored
// bytes read from the page cache) and writing them into one fresh sparse
// file in `dir`: a cold read's work on the CPU (the frame chunker's per
// frame, without its fetching), over at most `bytes` of the object. On this
// kind of VM the write into the file costs more CPU than zstd's decoding
// (perf: 57% against 37% of a fetch), so a limit from the decoding alone
// overstates what the cores can do.
Result<double> measure_decode_and_cache(const std::filesystem::path& path,
                                        const CompressedObject& object,
                                        const std::filesystem::path& dir, int threads,
                                        uint64_t bytes);

// The image's bytes [offset, offset + out.size()).
void fill_memory_image(uint64_t size, uint64_t seed, uint64_t offset, std::span<std::byte> out);

// Checks what it is given, in order from offset 0, against the image.
class MemoryImageChecker final : public ByteSink {
 public:
  MemoryImageChecker(uint64_t size, uint64_t seed) : size_(size), seed_(seed) {}
  Status write(std::span<const std::byte> data) override;

 private:
  const uint64_t size_;
  const uint64_t seed_;
  uint64_t offset_ = 0;
  uint64_t piece_index_ = UINT64_MAX;
  std::vector<std::byte> piece_;  // the image's piece holding offset_
};

}  // namespace lazyblock
