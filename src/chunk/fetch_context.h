// FetchContext: what one chunker shares with the fetches of its chunks.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <stop_token>
#include <string>

#include "cache/block_cache.h"
#include "chunk/chunker.h"
#include "common/io_context.h"
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
  std::stop_source stop;  // requested when the chunker goes away
  TaskGroup* tasks = nullptr;  // runs the streams

  // For ChunkerStats.
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> waiting{0};  // callers inside ChunkFetch::wait_for

  // The cache, once the object's size is known; set once, read without a lock.
  std::atomic<BlockCache*> cache{nullptr};

  // State below is protected by mu.
  std::mutex mu;
  std::unique_ptr<BlockCache> cache_owner;
  std::condition_variable size_learned;  // notified when cache is set or a fetch ends
  std::map<uint64_t, std::shared_ptr<ChunkFetch>> fetches;  // in flight, by chunk index
  int streams = 0;                                          // running, all chunks
  LinkEstimate estimate;

  // The cache for an object of `size` bytes: created on the first call; a
  // later call with another size is an error (the object changed under us).
  // Requires mu held.
  Result<BlockCache*> cache_for_size_locked(uint64_t size);

  // Folds what one stream saw into the estimate. Require mu held.
  void observe_ttfb_locked(double seconds);
  void observe_bandwidth_locked(double bytes_per_second);
};

}  // namespace lazyblock
