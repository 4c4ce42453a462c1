// image::DataFileWriter: assembles a new build's data file in a local file
// as pack finds its blocks, stored plain (BUILD/NAME) or cut into
// independently compressed frames (BUILD/NAME.zstd, .lz4; frame_table.h).
//
// Data flow: append() takes the uncompressed bytes of the data file in
// order. Plain, they are written at once. Compressed, they are gathered into
// frames of `frame_size` bytes; each full frame becomes one task for a pool
// of encoder threads (all cores), and at most two frames per thread are in
// flight: when that bounded queue is full, append() waits for the oldest
// frame, writes its compressed bytes after the previous frame's and records
// it in the frame table. Memory stays at a few frames whatever the image's
// size, and the file's frames are in order whatever order the encoders
// finish in. finish() encodes the last (shorter) frame, writes what is in
// flight and returns what a header records of the file.
//
// One thread calls append() and finish(); the encoder threads only see their
// own frame's bytes.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <span>
#include <vector>

#include "common/status.h"
#include "common/worker_pool.h"
#include "image/frame_table.h"

namespace lazyblock::image {

struct DataFileFormat {
  Codec codec = Codec::kNone;
  int level = 0;                          // the codec's (frame_codec.h, check_level)
  uint64_t frame_size = 2 * 1024 * 1024;  // uncompressed bytes per frame (E2B's 2 MiB)
  int threads = 0;                        // encoder threads; 0: one per core
  bool digest = false;                    // compute the SHA-256 (always when compressed)
};

// What a header says of the file written (BuildInfo's fields).
struct WrittenDataFile {
  uint64_t size = 0;                 // uncompressed bytes
  uint64_t stored_bytes = 0;         // bytes of the local file: what is uploaded
  std::array<uint8_t, 32> sha256{};  // of the uncompressed bytes; zeros unless computed
  FrameTable frame_table;            // codec kNone: plain
};

class DataFileWriter {
 public:
  // Writes into `fd` (an empty file, from offset 0; not owned) in `format`.
  // kInvalidArgument for a codec level or frame size that cannot be used.
  static Result<std::unique_ptr<DataFileWriter>> create(int fd, const DataFileFormat& format);
  ~DataFileWriter();
  DataFileWriter(const DataFileWriter&) = delete;
  DataFileWriter& operator=(const DataFileWriter&) = delete;

  // The next bytes of the uncompressed data file.
  Status append(std::span<const std::byte> bytes);

  // Uncompressed bytes appended so far.
  uint64_t size() const { return size_; }

  // Writes out the last frame and every frame in flight; then nothing more
  // may be appended.
  Result<WrittenDataFile> finish();

 private:
  struct Job;
  class Sha256;

  DataFileWriter(int fd, const DataFileFormat& format, int threads);
  // Hands the frame gathered in `current_` to the encoders.
  Status submit_frame();
  // Waits for the oldest frame in flight and writes it after the last one.
  Status write_oldest();

  const int fd_;
  const DataFileFormat format_;
  const size_t in_flight_limit_;
  std::unique_ptr<Sha256> sha_;
  uint64_t size_ = 0;
  uint64_t stored_ = 0;
  std::vector<std::byte> current_;              // the frame being gathered
  std::vector<std::vector<std::byte>> spare_;   // frame buffers to reuse
  std::deque<std::shared_ptr<Job>> in_flight_;  // oldest first
  FrameTable table_;
  // Last, so that it is destroyed first: its threads are joined while the
  // jobs they may still hold are alive.
  std::unique_ptr<WorkerPool> encoders_;
};

}  // namespace lazyblock::image
