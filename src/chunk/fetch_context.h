// FetchContext: what one chunker shares with the fetches of its chunks.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <stop_token>
#include <string>

#include <fmt/format.h>

#include "cache/block_cache.h"
#include "chunk/chunker.h"
#include "common/io_context.h"
#include "common/mutex.h"
#include "common/task_group.h"
#include "storage/object_store.h"

namespace lazyblock {

class ChunkFetch;

// What the chunker believes of its store's links: the time a new request
// takes to its first byte, and the bandwidth of one stream once it flows.
struct LinkEstimate {
  double ttfb_seconds = 0;
  double bytes_per_second = 0;
};

struct FetchContext {
  // Constant after construction.
  std::shared_ptr<ObjectStore> store;
  std::string key;
  ChunkerOptions options;
  std::stop_source stop;       // requested by cancel() or when the chunker goes away
  TaskGroup* tasks = nullptr;  // runs the streams

  // For ChunkerStats.
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> waiting{0};  // callers inside ChunkFetch::wait_for

  // The cache, once the object's size is known; set once, read without a lock.
  std::atomic<BlockCache*> cache{nullptr};

  // State below is protected by mu.
  Mutex mu;
  std::unique_ptr<BlockCache> cache_owner GUARDED_BY(mu);
  CondVar size_learned;  // notified when cache is set or a fetch ends
  std::map<uint64_t, std::shared_ptr<ChunkFetch>> fetches
      GUARDED_BY(mu);              // in flight, by chunk index
  int streams GUARDED_BY(mu) = 0;  // running, all chunks
  LinkEstimate estimate GUARDED_BY(mu);

  // Readahead: chunks overlapping [readahead_from, readahead_end) are still
  // to be handed to streams. Streams are started while fewer than
  // options.parallel are busy: a stream is busy from its start until
  // it is one time to first byte from its end (or ends), so a new request's
  // wait for its first byte overlaps the running streams' transfers.
  uint64_t readahead_from GUARDED_BY(mu) = 0;
  uint64_t readahead_end GUARDED_BY(mu) = 0;
  // Ranges asked for by prefetch(), started after the readahead range.
  std::deque<std::pair<uint64_t, uint64_t>> prefetches GUARDED_BY(mu);
  int busy_streams GUARDED_BY(mu) = 0;

  // The cache for an object of `size` bytes: created on the first call; a
  // later call with another size is an error (the object changed under us).
  // Requires mu held.
  Result<BlockCache*> cache_for_size_locked(uint64_t size) REQUIRES(mu);

  // The fetch of `chunk` in flight, or a new one (with no stream yet).
  // Requires mu held.
  std::shared_ptr<ChunkFetch> fetch_locked(uint64_t chunk) REQUIRES(mu);

  // Reads ahead over [from, until): restarts at `from` unless the readahead
  // in progress already lies within [from, until), then starts streams as
  // pump_readahead_locked does. Requires mu held and the cache created.
  void read_ahead_locked(uint64_t from, uint64_t until) REQUIRES(mu);
  // Starts streams for the next chunks of the readahead range, then of the
  // prefetched ranges, while fewer than options.parallel are busy.
  // Requires mu held.
  void pump_readahead_locked() REQUIRES(mu);

  // What a caller gets once the chunker's fetches are cancelled.
  Status cancelled_status() const {
    return Status::cancelled(fmt::format("fetch of {} cancelled: the server is stopping", key));
  }

  // Folds what one stream saw into the estimate. Require mu held.
  void observe_ttfb_locked(double seconds) REQUIRES(mu);
  void observe_bandwidth_locked(double bytes_per_second) REQUIRES(mu);
};

}  // namespace lazyblock
