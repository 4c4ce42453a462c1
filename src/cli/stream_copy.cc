#include "cli/stream_copy.h"

#include <algorithm>
#include <vector>

#include <fmt/format.h>

namespace lazyblock::cli {

void prepare_for_streaming(ChunkerOptions& options) {
  options.drop_behind = true;
  // The copy asks for its own readahead (a window it bounds); a chunker's
  // own would run up to twice as far ahead.
  options.readahead = false;
}

Status stream_in_order(const OrderedSource& source, ByteSink& sink, const ChunkerOptions& options) {
  // A chunk per read: the unit of fetching, so a chunk is written whole or
  // not at all, and given back whole once written.
  const uint64_t piece = options.chunk_size;
  // The chunk being copied and parallel chunks past it: with a
  // window of parallel chunks alone, a single stream (--parallel 1)
  // would fetch the next chunk only once this one is written out, leaving the
  // link idle for each chunk's write and its request's round trip. (The
  // chunker still keeps at most parallel streams transferring.)
  const uint64_t window = (static_cast<uint64_t>(options.parallel) + 1) * options.chunk_size;
  // Only for a source that cannot write straight from its cache.
  std::vector<std::byte> buffer(source.write_to ? 0 : piece);
  uint64_t asked = 0;  // prefetched up to here
  for (uint64_t position = 0;;) {
    if (source.size && position >= *source.size) return Status::ok();
    uint64_t ahead = position + window;
    if (source.size) ahead = std::min(ahead, *source.size);
    if (asked < ahead) {
      source.prefetch(asked, ahead - asked);
      asked = ahead;
    }
    uint64_t length = piece;
    if (source.size) length = std::min(length, *source.size - position);
    if (source.size && source.is_zero && source.is_zero(position, length)) {
      LB_RETURN_IF_ERROR(sink.write_zeros(length));
      position += length;
      continue;
    }
    Result<size_t> got = source.write_to
                             ? source.write_to(sink, position, length)
                             : source.read_at(std::span(buffer).first(length), position);
    if (!got) return got.status();
    if (!source.write_to && *got > 0) {
      LB_RETURN_IF_ERROR(sink.write(std::span(buffer).first(*got)));
    }
    position += *got;
    if (*got < length) {
      if (!source.size) return Status::ok();
      return Status::corruption(
          fmt::format("the source ended at {}, before its size {}", position, *source.size));
    }
  }
}

}  // namespace lazyblock::cli
