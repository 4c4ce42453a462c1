// stream_in_order: a whole object or device copied to a sink in order,
// through a bounded window of its block cache (cat, export).
//
// Data flow: the copier asks its source to fetch `window` bytes ahead of
// where it reads (prefetch(), which keeps --parallel streams transferring),
// writes the next chunk to the sink once it is cached, straight from the
// cache map where the source can (a chunker's write_range_to: for a file
// descriptor, write(2) from the map, no copy in between), else through a
// buffer read with read_at (a guarded copy out of the map), and moves on.
// Either way a failing cache file is an error naming the object and
// offset, never a SIGBUS. The source's chunkers run
// with drop_behind (prepare_for_streaming), so each chunk's blocks are given
// back to the filesystem once copied: the cache needs room for the window,
// about --parallel chunks, not for the object. Ranges the source knows to be
// zeros are written as zeros (holes in a regular file) without a read.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <type_traits>

#include "chunk/chunker.h"
#include "common/byte_sink.h"
#include "common/status.h"
#include "storage/object_store.h"

namespace lazyblock::cli {

// What stream_in_order reads.
struct OrderedSource {
  // Copies [offset, offset + buffer.size()) clipped to the end; the count.
  std::function<Result<size_t>(std::span<std::byte> buffer, uint64_t offset)> read_at;
  // If set: writes [offset, offset + length) clipped to the end straight
  // from the source's cache to the sink (no copy of its own); the count.
  // Used instead of read_at.
  std::function<Result<size_t>(ByteSink& sink, uint64_t offset, uint64_t length)> write_to;
  // Starts fetching [offset, offset + length) without waiting.
  std::function<void(uint64_t offset, uint64_t length)> prefetch;
  // Known before the first read (a device), or not (a raw object, whose
  // first read learns it): then the copy ends at the first short read.
  std::optional<uint64_t> size;
  // If set (with size): whether [offset, offset + length) reads as zeros
  // with no fetch.
  std::function<bool(uint64_t offset, uint64_t length)> is_zero;
};

// The source of a Chunker (read_at, prefetch) or an image::Disk (read,
// prefetch); a size() that returns a plain number and an is_zero() are used
// if it has them (a disk).
template <typename Reader>
OrderedSource source_of(Reader& reader) {
  OrderedSource source;
  source.read_at = [&reader](std::span<std::byte> buffer, uint64_t offset) {
    if constexpr (requires { reader.read_at(buffer, offset); }) {
      return reader.read_at(buffer, offset);
    } else {
      return reader.read(buffer, offset);
    }
  };
  if constexpr (requires(ByteSink & sink) {
                  reader.write_range_to(sink, uint64_t{0}, uint64_t{0});
                }) {
    source.write_to = [&reader](ByteSink& sink, uint64_t offset, uint64_t length) {
      return reader.write_range_to(sink, offset, length);
    };
  }
  source.prefetch = [&reader](uint64_t offset, uint64_t length) {
    reader.prefetch(offset, length);
  };
  if constexpr (std::is_same_v<decltype(reader.size()), uint64_t>) source.size = reader.size();
  if constexpr (requires { reader.is_zero(uint64_t{0}, uint64_t{0}); }) {
    source.is_zero = [&reader](uint64_t offset, uint64_t length) {
      return reader.is_zero(offset, length);
    };
  }
  return source;
}

// Sets the chunker options of a source that stream_in_order will read: its
// blocks are dropped once read, and it reads ahead only as asked.
void prepare_for_streaming(ChunkerOptions& options);

// Copies the whole of `source`, read through chunkers with `options`, to
// `sink` in order: a chunk at a time (a chunk is written once it is wholly
// cached), with one chunk per stream (--parallel) asked for ahead.
Status stream_in_order(const OrderedSource& source, ByteSink& sink, const ChunkerOptions& options);

// What stream_object did, for the log.
struct StreamedObject {
  uint64_t bytes = 0;
  uint64_t requests = 0;
};

// Copies the whole object at `key` to `sink` as one stream with no cache:
// what `cat --parallel 1` does. With nothing fetched ahead of the writer,
// a cache would only cost a copy into new page-cache memory and a
// copy out of it; here each batch goes from the store's reader straight to
// the sink. One range request per chunk, each with the fetch deadline
// (--timeout is per chunk fetch, as through a chunker). The object must keep
// its size and version from range to range, and each range must bring
// exactly the bytes it promised: else kCorruption, naming the store and the
// key.
Result<StreamedObject> stream_object(ObjectStore& store, const std::string& key,
                                     const ChunkerOptions& options, ByteSink& sink);

}  // namespace lazyblock::cli
