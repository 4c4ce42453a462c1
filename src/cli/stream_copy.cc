#include "cli/stream_copy.h"

#include <algorithm>
#include <memory>
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

Result<StreamedObject> stream_object(ObjectStore& store, const std::string& key,
                                     const ChunkerOptions& options, ByteSink& sink) {
  // The store's reader hands over what one receive brought (an HTTP
  // store's at most 256 KiB): a batch this size takes all of it.
  constexpr size_t kBatch = 256 * 1024;
  std::vector<std::byte> batch(kBatch);
  StreamedObject streamed;
  std::optional<ObjectInfo> object;  // from the first range's answer
  for (uint64_t position = 0; !object || position < object->size;) {
    const IoContext io{Clock::now() + options.fetch_timeout, {}};
    // Past the first range, the size is known: a range asks for no more
    // than the object holds, as a chunker's do.
    const uint64_t asked =
        object ? std::min(options.chunk_size, object->size - position) : options.chunk_size;
    Result<std::unique_ptr<RangeReader>> opened = store.open_range(key, position, asked, io);
    ++streamed.requests;
    // The store's errors name the store, the key and the range already.
    if (!opened) return opened.status();
    RangeReader& reader = **opened;
    const std::string name =
        fmt::format("{}: read {} [{}, {})", store.location(), key, position, position + asked);
    const ObjectInfo answered{reader.object_size(), reader.object_version()};
    if (!object) {
      object = answered;
    } else if (answered != *object) {
      return Status::corruption(fmt::format(
          "{}: the object changed during the copy (size {}, version '{}'; before: {}, '{}')", name,
          answered.size, answered.version, object->size, object->version));
    }
    const uint64_t promised = std::min(options.chunk_size, object->size - position);
    if (reader.range_length() != promised) {
      return Status::corruption(fmt::format("{}: the store promised {} bytes, expected {}", name,
                                            reader.range_length(), promised));
    }
    for (uint64_t left = promised; left > 0;) {
      Result<size_t> got = reader.read(std::span(batch).first(std::min<uint64_t>(kBatch, left)));
      if (!got) return got.status();
      if (*got == 0) {
        return Status::corruption(fmt::format("{}: the stream ended after {} of {} bytes", name,
                                              promised - left, promised));
      }
      LB_RETURN_IF_ERROR(sink.write(std::span(batch).first(*got)));
      left -= *got;
      position += *got;
      streamed.bytes += *got;
    }
    // A stream that goes on past what it promised is not this range's.
    std::byte extra;
    Result<size_t> more = reader.read(std::span(&extra, 1));
    if (!more) return more.status();
    if (*more != 0) {
      return Status::corruption(
          fmt::format("{}: the stream sent more than the {} bytes promised", name, promised));
    }
  }
  return streamed;
}

}  // namespace lazyblock::cli
