#include "chunk/cache_copy.h"

#include <fmt/format.h>

#include "common/log.h"

namespace lazyblock {
namespace {

// The loop of cache_copy.h. copy_from_map(position, end) copies what it can
// of [position, end) from the map and returns the bytes copied, fewer than
// asked if the map faulted, or the sink's error. copy_again_after_a_drop:
// whether bytes copied may be copied again (a buffer's may; a sink's went
// out).
template <typename CopyFromMap>
Result<size_t> copy_with_one_refetch(CachedRanges& ranges, const BlockCache& cache,
                                     std::string_view key, uint64_t offset, uint64_t end,
                                     bool copy_again_after_a_drop, CopyFromMap copy_from_map) {
  uint64_t position = offset;  // copied up to here
  Status failed;
  for (int attempt = 0; attempt < 2; ++attempt) {
    {
      Result<BlockCache::Pin> pin = ranges.fetch_pinned(position, end);
      if (!pin) return pin.status();
      const uint64_t drops = cache.drops();
      if (!cache.is_cached(position, end)) {
        // Dropped between the fetch and the look at drops(): fetch again.
        failed = Status::io_error(
            fmt::format("{} [{}, {}): the cache was dropped under the read", key, position, end));
        continue;
      }
      Result<size_t> copied = copy_from_map(position, end);
      if (!copied) return copied.status();  // the sink's own error names it
      if (!cache.copy_holds(drops)) {
        // What was copied may be the hole a drop left.
        failed = BlockCache::unreadable(position, end).with_context(key);
        if (!copy_again_after_a_drop) return failed;
        continue;
      }
      position += *copied;
      if (position == end) return end - offset;
    }
    failed = BlockCache::unreadable(position, end).with_context(key);
    log(LogLevel::kWarn, "{}; fetching it again", failed.to_string());
    ranges.drop_lost(position, end);
  }
  return failed;
}

}  // namespace

Result<size_t> read_through_cache(CachedRanges& ranges, const BlockCache& cache,
                                  std::string_view key, std::span<std::byte> out, uint64_t offset) {
  return copy_with_one_refetch(
      ranges, cache, key, offset, offset + out.size(), /*copy_again_after_a_drop=*/true,
      [&](uint64_t position, uint64_t end) -> Result<size_t> {
        // All or nothing: a copy that faulted is made again whole.
        const uint64_t from = position - offset;
        if (!cache.copy_out(position, out.subspan(from, end - position)).is_ok()) return size_t{0};
        return end - position;
      });
}

bool copy_if_cached(const BlockCache& cache, std::span<std::byte> out, uint64_t offset) {
  const uint64_t end = offset + out.size();
  const BlockCache::Pin pin = cache.pin(offset, end);
  const uint64_t drops = cache.drops();
  return cache.is_cached(offset, end) && cache.copy_out(offset, out).is_ok() &&
         cache.copy_holds(drops);
}

Result<size_t> write_through_cache(CachedRanges& ranges, const BlockCache& cache,
                                   std::string_view key, ByteSink& sink, uint64_t offset,
                                   uint64_t end) {
  return copy_with_one_refetch(
      ranges, cache, key, offset, end,
      /*copy_again_after_a_drop=*/false, [&](uint64_t position, uint64_t stop) {
        return sink.write_from_mapping(cache.slice(position, stop - position));
      });
}

}  // namespace lazyblock
