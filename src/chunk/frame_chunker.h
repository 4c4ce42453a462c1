// FrameChunker: the Chunker of an object stored as compressed frames (a
// compressed build's data file, BUILD/NAME.zstd or .lz4).
//
// Data flow: the frame table says, for each frame, which uncompressed range
// it holds and where its compressed bytes are stored. A read of a range not
// yet cached finds the frames it touches (binary search), makes sure one
// fetch is under way for each (shared by every reader of that frame), and
// waits. A fetch reads the frame's compressed bytes in one range request,
// decompresses them on its own thread (never under a lock a reader needs),
// checks the frame's checksum and size, and only then writes the frame's
// bytes to the block cache and marks its blocks cached: a reader never sees
// bytes of a frame that did not verify. A failed fetch leaves nothing cached
// and wakes its readers with an error naming the object and the frame; the
// next read fetches again.
//
// Frames, not 4 MiB chunks, are the unit of fetching here, so there is no
// split: a frame is decompressed whole. Sequential reads (and write_to) keep
// parallel frames in flight ahead of the reader; prefetch() queues
// frames behind them. Cached reads take no lock.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "chunk/chunker.h"
#include "chunk/frame_codec.h"

namespace lazyblock {

// One frame: uncompressed bytes [offset, offset + size) of the object are
// the decompression of stored bytes [stored_offset, stored_offset +
// stored_size) of the compressed object.
struct CompressedFrame {
  uint64_t offset = 0;
  uint64_t size = 0;
  uint64_t stored_offset = 0;
  uint64_t stored_size = 0;
};

// The frames of one compressed object, as plain geometry (the chunk layer
// knows no header): sorted, never overlapping. There may be gaps (a header
// lists only the frames its mappings reach): reading a gap is an error.
struct FrameGeometry {
  FrameCodec codec = FrameCodec::kZstd;
  std::vector<CompressedFrame> frames;

  // The end of the last frame: the uncompressed bytes this object serves.
  uint64_t size() const { return frames.empty() ? 0 : frames.back().offset + frames.back().size; }
  // The index of the frame holding uncompressed byte `offset`, if one does.
  std::optional<size_t> frame_at(uint64_t offset) const;
  // OK if the frames are sorted, not empty, do not overlap, and every
  // frame's offset is a multiple of `block_size` (no block straddles two).
  Status validate(uint64_t block_size) const;
};

// A chunker for the compressed object `key` of `store` whose frames
// `table` describes. Fails if the table is inconsistent.
Result<std::unique_ptr<Chunker>> make_frame_chunker(std::shared_ptr<ObjectStore> store,
                                                    std::string key, FrameGeometry table,
                                                    ChunkerOptions options);

}  // namespace lazyblock
