// FetchSession: one range stream filling one chunk of the cache, and the
// callers waiting on it. Shared by every fetch strategy.
//
// A session reads [begin, end) of its chunk from the store in batches and
// writes each batch to the cache as it arrives (skipping blocks already
// cached, so a cached block is never written), and publishes progress:
// blocks wholly written are marked cached, and waiters whose range is now
// cached are woken, in order of their end byte. The `full` strategy publishes
// once, at the end; `streaming` after every batch. When the stream ends, fails
// or passes its deadline, the session publishes what was wholly written,
// records its status, leaves the chunker's table of sessions and wakes all
// remaining waiters.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>

#include "cache/block_cache.h"
#include "chunk/chunker.h"
#include "common/io_context.h"
#include "common/status.h"
#include "storage/object_store.h"

namespace lazyblock {

class FetchSession;

// What one chunker shares with its fetch sessions.
struct FetchContext {
  // Constant after construction.
  std::shared_ptr<ObjectStore> store;
  std::string key;
  ChunkerOptions options;
  std::stop_source stop;  // requested when the chunker goes away

  // For ChunkerStats.
  std::atomic<uint64_t> requests{0};
  std::atomic<uint64_t> bytes{0};
  std::atomic<uint64_t> waiting{0};  // callers inside FetchSession::wait_for

  // The cache, once the object's size is known; set once, read without a lock.
  std::atomic<BlockCache*> cache{nullptr};

  // State below is protected by mu.
  std::mutex mu;
  std::unique_ptr<BlockCache> cache_owner;
  std::condition_variable size_learned;  // notified when cache is set or a session ends
  std::map<uint64_t, std::shared_ptr<FetchSession>> sessions;  // in flight, by chunk index

  // The cache for an object of `size` bytes: created on the first call; a
  // later call with another size is an error (the object changed under us).
  // Requires mu held.
  Result<BlockCache*> cache_for_size_locked(uint64_t size);
};

class FetchSession {
 public:
  // A fetch of [begin, end) of chunk `chunk` (end may pass the object's end
  // while its size is unknown), due by `deadline`.
  FetchSession(FetchContext& context, uint64_t chunk, uint64_t begin, uint64_t end,
               Clock::time_point deadline);

  // Streams the range to its end, then finishes the session. Runs on the
  // session's own thread.
  void run();

  // Waits until every block of [begin, end) (within this chunk, within the
  // object) is cached, the session has ended, or its deadline has passed.
  // `lock` holds context.mu. Returns OK once the range is cached or the session
  // ended without error (the caller then looks again), else the session's
  // error or kTimeout.
  Status wait_for(std::unique_lock<std::mutex>& lock, uint64_t begin, uint64_t end);

  // Waits until the session has ended or `until` has passed; true if it has
  // ended. `lock` holds context.mu.
  bool wait_until_finished(std::unique_lock<std::mutex>& lock, Clock::time_point until) {
    return cv_.wait_until(lock, until, [this] { return finished_; });
  }

  // Requires context.mu held.
  bool finished_locked() const { return finished_; }
  const Status& status_locked() const { return status_; }
  Clock::time_point deadline() const { return deadline_; }

 private:
  struct Waiter {
    bool woken = false;  // guarded by context.mu
  };

  // Reads the range into the cache; the status the session ends with.
  Status stream();
  // Marks the blocks wholly written below `position` cached and wakes the
  // waiters whose ranges they complete.
  void publish(uint64_t position);
  // Wakes the waiters whose end is at or before marked_. Requires context.mu.
  void wake_satisfied_locked();

  FetchContext& context_;
  const uint64_t chunk_;
  const uint64_t begin_;
  const Clock::time_point deadline_;
  const IoContext io_;
  const std::string name_;  // "KEY [begin, end)" for messages

  // Owned by the session's thread.
  uint64_t end_;          // clipped to the object once its size is known
  BlockCache* cache_ = nullptr;
  uint64_t position_;     // bytes [begin_, position_) have arrived
  uint64_t marked_;       // blocks [begin_, marked_) are published
  uint64_t next_wake_;    // the end of the first waiter's range, as last seen

  // State below is protected by context.mu.
  std::condition_variable cv_;
  std::multimap<uint64_t, Waiter*> waiters_;  // by the end of the range awaited
  bool finished_ = false;
  Status status_;
};

}  // namespace lazyblock
