#include "chunk/fetching_chunker.h"

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "common/log.h"
#include "common/units.h"

namespace lazyblock {
namespace {

// Sequential reads start reading ahead this far past their end, and double
// it with each further sequential read (as mountpoint-s3 does from ~1 MiB).
constexpr uint64_t kFirstReadaheadWindow = 1 * kMiB;

// Rounds of fetch-then-pin before a read gives up on a cache whose
// filesystem is so full that its blocks are given back before they are read.
constexpr int kFetchAttempts = 4;

// Readahead runs at most this far ahead of the reader: enough chunks to keep
// parallel streams transferring while the next requests wait for
// their first bytes.
uint64_t max_readahead_window(const ChunkerOptions& options) {
  return 2 * static_cast<uint64_t>(options.parallel) * options.chunk_size;
}

}  // namespace

Result<FetchStrategy> parse_fetch_strategy(std::string_view name) {
  if (name == "full") return FetchStrategy::kFull;
  if (name == "streaming") return FetchStrategy::kStreaming;
  if (name == "split") return FetchStrategy::kSplit;
  return Status::invalid_argument(
      fmt::format("unknown fetch strategy '{}' (expected full, streaming or split)", name));
}

std::string_view fetch_strategy_name(FetchStrategy strategy) {
  switch (strategy) {
    case FetchStrategy::kFull:
      return "full";
    case FetchStrategy::kStreaming:
      return "streaming";
    case FetchStrategy::kSplit:
      return "split";
  }
  return "unknown";
}

Result<std::unique_ptr<Chunker>> make_chunker(std::shared_ptr<ObjectStore> store, std::string key,
                                              std::optional<uint64_t> size,
                                              ChunkerOptions options) {
  if (options.block_size == 0 || options.chunk_size == 0 ||
      options.chunk_size % options.block_size != 0) {
    return Status::invalid_argument(
        fmt::format("chunk size {} must be a positive multiple of the block size {}",
                    options.chunk_size, options.block_size));
  }
  if (options.fetch_timeout <= std::chrono::nanoseconds::zero()) {
    return Status::invalid_argument("the fetch timeout must be positive");
  }
  if (options.max_streams_per_chunk < 1 || options.max_streams < 1 || options.parallel < 1 ||
      options.expected_bandwidth <= 0 || options.expected_ttfb.count() < 0) {
    return Status::invalid_argument(
        "stream bounds must be at least 1, and the expected link sane (bandwidth > 0)");
  }
  auto chunker =
      std::make_unique<FetchingChunker>(std::move(store), std::move(key), std::move(options));
  if (size) LB_RETURN_IF_ERROR(chunker->set_size(*size));
  return std::unique_ptr<Chunker>(std::move(chunker));
}

FetchingChunker::FetchingChunker(std::shared_ptr<ObjectStore> store, std::string key,
                                 ChunkerOptions options) {
  context_.store = std::move(store);
  context_.key = std::move(key);
  context_.options = std::move(options);
  context_.tasks = &tasks_;
  context_.estimate = {std::chrono::duration<double>(context_.options.expected_ttfb).count(),
                       context_.options.expected_bandwidth};
}

FetchingChunker::~FetchingChunker() {
  context_.stop.request_stop();
  tasks_.wait();
}

Status FetchingChunker::set_size(uint64_t size) {
  MutexLock lock(context_.mu);
  return context_.cache_for_size_locked(size).status();
}

Result<uint64_t> FetchingChunker::size() {
  if (BlockCache* cache = context_.cache.load(std::memory_order_acquire)) return cache->size();
  return stat_size();
}

Result<uint64_t> FetchingChunker::stat_size() {
  const IoContext io{Clock::now() + context_.options.fetch_timeout, context_.stop.get_token()};
  Result<uint64_t> size = context_.store->stat(context_.key, io);
  if (!size) return size.status();
  MutexLock lock(context_.mu);
  Result<BlockCache*> cache = context_.cache_for_size_locked(*size);
  if (!cache) return cache.status();
  return (*cache)->size();
}

Result<uint64_t> FetchingChunker::learn_size(uint64_t offset) {
  if (BlockCache* cache = context_.cache.load(std::memory_order_acquire)) return cache->size();
  MutexLock lock(context_.mu);
  for (;;) {
    if (BlockCache* cache = context_.cache.load(std::memory_order_acquire)) return cache->size();
    // The first stream of a chunk learns the size: one in flight for this
    // chunk, or a new one.
    std::shared_ptr<ChunkFetch> fetch = context_.fetch_locked(offset / context_.options.chunk_size);
    if (context_.stop.stop_requested()) return context_.cancelled_status();
    fetch->cover_locked(offset, offset);
    const bool in_time = context_.size_learned.wait_until(
        lock, Clock::now() + context_.options.fetch_timeout, [&]() REQUIRES(context_.mu) {
          return context_.cache.load(std::memory_order_acquire) != nullptr ||
                 fetch->finished_locked() || context_.stop.stop_requested();
        });
    if (context_.cache.load(std::memory_order_acquire) != nullptr) continue;
    if (context_.stop.stop_requested()) return context_.cancelled_status();
    if (!in_time) {
      return Status::timeout(fmt::format("{}: size of {}: no answer by the deadline",
                                         context_.store->location(), context_.key));
    }
    const Status& status = fetch->last_error_locked();
    if (status.code() == StatusCode::kOutOfRange) {
      // The offset lies past the end: only a stat() can tell where the end is.
      lock.unlock();
      return stat_size();
    }
    if (!status.is_ok()) return status;
  }
}

void FetchingChunker::note_read(uint64_t offset, uint64_t end) {
  if (!context_.options.readahead) return;
  SequentialRun* run = nullptr;
  for (SequentialRun& candidate : runs_) {
    if (candidate.end.load(std::memory_order_relaxed) == offset) {
      run = &candidate;
      break;
    }
  }
  if (run == nullptr) {
    // Not sequential to any run: perhaps the first read of a new one. (No
    // read-modify-write: a hit costs a few nanoseconds more with one.)
    const uint32_t slot = next_run_.load(std::memory_order_relaxed);
    next_run_.store(slot + 1, std::memory_order_relaxed);
    SequentialRun& fresh = runs_[slot % kSequentialRuns];
    fresh.end.store(end, std::memory_order_relaxed);
    if (fresh.window.load(std::memory_order_relaxed) != 0) {
      fresh.window.store(0, std::memory_order_relaxed);
    }
    return;
  }
  run->end.store(end, std::memory_order_relaxed);
  const uint64_t window =
      std::min(std::max(kFirstReadaheadWindow, 2 * run->window.load(std::memory_order_relaxed)),
               max_readahead_window(context_.options));
  run->window.store(window, std::memory_order_relaxed);
  // Readahead starts whole chunks: the lock is needed only when the window's
  // end has moved into another chunk.
  const uint64_t until_chunk = (end + window - 1) / context_.options.chunk_size;
  if (run->until_chunk.exchange(until_chunk, std::memory_order_relaxed) == until_chunk) return;
  MutexLock lock(context_.mu);
  context_.read_ahead_locked(end, end + window);
}

Status FetchingChunker::fetch_range(uint64_t offset, uint64_t end) {
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  if (cache->is_cached(offset, end)) return Status::ok();
  const uint64_t chunk_size = context_.options.chunk_size;
  const uint64_t first = offset / chunk_size;
  const uint64_t last = (end - 1) / chunk_size;
  MutexLock lock(context_.mu);
  // Start every chunk's streams before waiting on any, so that they overlap.
  for (uint64_t chunk = first; chunk <= last; ++chunk) {
    const uint64_t begin = std::max(offset, chunk * chunk_size);
    const uint64_t stop = std::min(end, (chunk + 1) * chunk_size);
    if (!cache->is_cached(begin, stop)) context_.fetch_locked(chunk)->cover_locked(begin, stop);
  }
  for (uint64_t chunk = first; chunk <= last; ++chunk) {
    const uint64_t begin = std::max(offset, chunk * chunk_size);
    const uint64_t stop = std::min(end, (chunk + 1) * chunk_size);
    // Each round either caches the range, fails, or ends every stream of the
    // chunk (then the next round fetches afresh), so this loop ends.
    while (!cache->is_cached(begin, stop)) {
      LB_RETURN_IF_ERROR(context_.fetch_locked(chunk)->wait_for(lock, begin, stop));
    }
  }
  return Status::ok();
}

Result<BlockCache::Pin> FetchingChunker::fetch_pinned(uint64_t offset, uint64_t end) {
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  for (int attempt = 0; attempt < kFetchAttempts; ++attempt) {
    LB_RETURN_IF_ERROR(fetch_range(offset, end));
    BlockCache::Pin pin = cache->pin(offset, end);
    // Blocks given back for space between the fetch and the pin are
    // fetched again.
    if (cache->is_cached(offset, end)) return pin;
  }
  return evicted_status(offset, end);
}

Status FetchingChunker::evicted_status(uint64_t offset, uint64_t end) const {
  return Status::io_error(fmt::format(
      "{} [{}, {}): its cache's filesystem is so full that the bytes were given back {} times "
      "before they could be read",
      context_.key, offset, end, kFetchAttempts));
}

Result<std::span<const std::byte>> FetchingChunker::slice(uint64_t offset, uint64_t length) {
  if (length == 0) return std::span<const std::byte>();
  Result<uint64_t> size = learn_size(offset);
  if (!size) return size.status();
  if (offset >= *size) return std::span<const std::byte>();
  const uint64_t end = length > *size - offset ? *size : offset + length;
  note_read(offset, end);
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  for (int attempt = 0; attempt < kFetchAttempts; ++attempt) {
    LB_RETURN_IF_ERROR(fetch_range(offset, end));
    cache->hold_for_thread(offset, end);
    if (cache->is_cached(offset, end)) return cache->slice(offset, end - offset);
  }
  return evicted_status(offset, end);
}

std::optional<std::span<const std::byte>> FetchingChunker::cached_slice(uint64_t offset,
                                                                        uint64_t length) {
  const BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  if (cache == nullptr || offset >= cache->size()) return std::nullopt;
  const uint64_t end = offset + std::min(length, cache->size() - offset);
  if (!cache->is_cached(offset, end)) return std::nullopt;
  // Held, then looked at again: it may have been given back for space
  // before the hold.
  cache->hold_for_thread(offset, end);
  if (!cache->is_cached(offset, end)) return std::nullopt;
  return cache->slice(offset, end - offset);
}

bool FetchingChunker::read_cached(std::span<std::byte> buffer, uint64_t offset) {
  const BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  if (cache == nullptr || offset > cache->size() || buffer.size() > cache->size() - offset) {
    return false;
  }
  return copy_if_cached(*cache, buffer, offset);
}

Result<size_t> FetchingChunker::read_at(std::span<std::byte> buffer, uint64_t offset) {
  if (buffer.empty()) return size_t{0};
  Result<uint64_t> size = learn_size(offset);
  if (!size) return size.status();
  if (offset >= *size) return size_t{0};
  const uint64_t end = offset + std::min<uint64_t>(buffer.size(), *size - offset);
  note_read(offset, end);
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  Result<size_t> read =
      read_through_cache(*this, *cache, context_.key, buffer.first(end - offset), offset);
  if (read && context_.options.drop_behind) cache->release(offset, end);
  return read;
}

Result<size_t> FetchingChunker::write_range_to(ByteSink& sink, uint64_t offset, uint64_t length) {
  if (length == 0) return size_t{0};
  Result<uint64_t> size = learn_size(offset);
  if (!size) return size.status();
  if (offset >= *size) return size_t{0};
  const uint64_t end = offset + std::min(length, *size - offset);
  note_read(offset, end);
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  Result<size_t> written = write_through_cache(*this, *cache, context_.key, sink, offset, end);
  if (written && context_.options.drop_behind) cache->release(offset, end);
  return written;
}

void FetchingChunker::drop_lost(uint64_t offset, uint64_t end) {
  MutexLock lock(context_.mu);
  context_.cache.load(std::memory_order_acquire)->drop(offset, end);
}

Status FetchingChunker::write_to(ByteSink& sink) {
  Result<uint64_t> size = learn_size(0);
  if (!size) return size.status();
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  const uint64_t chunk_size = context_.options.chunk_size;
  const uint64_t chunks = div_round_up(*size, chunk_size);
  const uint64_t window = max_readahead_window(context_.options);
  for (uint64_t chunk = 0; chunk < chunks; ++chunk) {
    const uint64_t begin = chunk * chunk_size;
    const uint64_t end = std::min(*size, begin + chunk_size);
    {
      MutexLock lock(context_.mu);
      context_.read_ahead_locked(begin, begin + window);
    }
    Result<BlockCache::Pin> pin = fetch_pinned(begin, end);
    if (!pin) return pin.status();
    LB_RETURN_IF_ERROR(sink.write(cache->slice(begin, end - begin)));
  }
  return Status::ok();
}

void FetchingChunker::prefetch(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  MutexLock lock(context_.mu);
  if (context_.cache.load(std::memory_order_acquire) == nullptr) {
    // The size is unknown: the first chunk's stream learns it, and the range
    // waits its turn behind that.
    context_.fetch_locked(offset / context_.options.chunk_size)->cover_locked(offset, offset);
  }
  context_.prefetches.emplace_back(offset, offset + std::min(length, UINT64_MAX - offset));
  context_.pump_readahead_locked();
}

void FetchingChunker::cancel() {
  // The stores' waits end on the stop; the callers' waits end here, so that
  // none depends on how soon a store notices.
  context_.stop.request_stop();
  MutexLock lock(context_.mu);
  for (auto& [chunk, fetch] : context_.fetches) fetch->cancel_waiters_locked();
  context_.size_learned.notify_all();
}

ChunkerStats FetchingChunker::stats() const {
  MutexLock lock(context_.mu);
  return {context_.requests.load(std::memory_order_relaxed),
          context_.bytes.load(std::memory_order_relaxed),
          context_.waiting.load(std::memory_order_relaxed),
          static_cast<uint64_t>(context_.streams)};
}

}  // namespace lazyblock
