#include "chunk/fetch_context.h"
#include "common/file_io.h"

#include <algorithm>
#include <cstdlib>

#include <fmt/format.h>

#include "chunk/chunk_fetch.h"

namespace lazyblock {
namespace {

// Weight of the newest observation in the estimates: recent enough to follow
// a store that slows down, steady enough that one odd stream does not swing
// the plan.
constexpr double kEstimateWeight = 0.25;

}  // namespace

Result<BlockCache*> FetchContext::cache_for_size_locked(uint64_t size) {
  if (BlockCache* existing = cache.load(std::memory_order_acquire)) {
    if (existing->size() != size) {
      return Status::corruption(
          fmt::format("object {} changed size: was {} bytes, the store now "
                      "reports {}",
                      key, existing->size(), size));
    }
    return existing;
  }
  const std::filesystem::path dir =
      options.cache_dir.empty() ? temp_directory() : options.cache_dir;
  Result<std::unique_ptr<BlockCache>> created = BlockCache::create(size, options.block_size, dir);
  if (!created) return created.status().with_context("cache for " + key);
  cache_owner = std::move(created).value();
  cache.store(cache_owner.get(), std::memory_order_release);
  size_learned.notify_all();
  return cache_owner.get();
}

std::shared_ptr<ChunkFetch> FetchContext::fetch_locked(uint64_t chunk) {
  std::shared_ptr<ChunkFetch>& fetch = fetches[chunk];
  if (!fetch) fetch = std::make_shared<ChunkFetch>(*this, chunk);
  return fetch;
}

void FetchContext::read_ahead_locked(uint64_t from, uint64_t until) {
  if (readahead_from < from || readahead_from > until) readahead_from = from;
  readahead_end = until;
  pump_readahead_locked();
}

void FetchContext::pump_readahead_locked() {
  BlockCache* blocks = cache.load(std::memory_order_acquire);
  if (blocks == nullptr) return;
  const uint64_t chunk_size = options.chunk_size;
  const uint64_t end = std::min(readahead_end, blocks->size());
  while (readahead_from < end && busy_streams < options.parallel && streams < options.max_streams) {
    const uint64_t chunk = readahead_from / chunk_size;
    const uint64_t chunk_begin = chunk * chunk_size;
    const uint64_t chunk_end = std::min(chunk_begin + chunk_size, blocks->size());
    if (!blocks->is_cached(chunk_begin, chunk_end)) {
      fetch_locked(chunk)->cover_locked(chunk_begin, chunk_end);
    }
    readahead_from = chunk_end;
  }
  while (!prefetches.empty() && busy_streams < options.parallel && streams < options.max_streams) {
    auto& [begin, stop] = prefetches.front();
    const uint64_t range_end = std::min(stop, blocks->size());
    if (begin >= range_end) {
      prefetches.pop_front();
      continue;
    }
    const uint64_t chunk = begin / chunk_size;
    const uint64_t part_end = std::min(range_end, (chunk + 1) * chunk_size);
    if (!blocks->is_cached(begin, part_end)) fetch_locked(chunk)->cover_locked(begin, part_end);
    begin = part_end;
  }
}

void FetchContext::observe_ttfb_locked(double seconds) {
  estimate.ttfb_seconds += kEstimateWeight * (seconds - estimate.ttfb_seconds);
}

void FetchContext::observe_bandwidth_locked(double bytes_per_second) {
  estimate.bytes_per_second += kEstimateWeight * (bytes_per_second - estimate.bytes_per_second);
}

}  // namespace lazyblock
