// ChunkFetch: the streams filling one chunk of the cache, and the callers
// waiting on them. Shared by every fetch strategy.
//
// A stream reads [begin, end) of the chunk from the store in batches and
// writes each batch to the cache as it arrives (skipping blocks already
// cached, so a cached block is never written twice), then publishes: blocks
// wholly written are marked cached and waiters whose ranges are now cached are
// woken. `full` publishes once, when its stream ends; `streaming` and `split`
// after every batch, and stop each read at the next waiter's end so that it
// is woken the moment its bytes are in.
//
// Every uncached block a caller needs is covered by exactly one running
// stream: a caller starts streams for the gaps (from the first missing block
// of the gap to the next stream or the chunk's end). Under `split`, a caller
// whose bytes the covering stream would bring later than a new request would
// cuts that stream at a block boundary past what it has in flight, and starts
// a new stream from there to the old end. A stream past its deadline is cut
// the same way, so that a new caller never inherits its timeout.
//
// When a stream ends it publishes what it wrote whole; if it failed, each
// waiter that needed one of the blocks it did not deliver gets its error.
// When the last stream ends the fetch leaves the chunker's table.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "chunk/fetch_context.h"
#include "common/mutex.h"
#include "common/status.h"

namespace lazyblock {

class FetchStream;

class ChunkFetch : public std::enable_shared_from_this<ChunkFetch> {
 public:
  ChunkFetch(FetchContext& context, uint64_t chunk);

  // The functions below that others call with context.mu held say so with
  // context_.mu.assert_held() (checked in Debug builds), not REQUIRES: the
  // caller locked the mutex as its own context's, and the analysis cannot
  // see that a fetch's context_ is that same context.

  // Waits until every block of [begin, end) (within this chunk, within the
  // object, whose size is known) is cached, scheduling streams as the
  // strategy says. `lock` holds context.mu. OK once the range is cached or
  // when every stream has ended without delivering it (the caller looks
  // again); else the error of a stream that was to deliver part of the range,
  // kTimeout, or kCancelled once the chunker is cancelled.
  Status wait_for(MutexLock& lock, uint64_t begin, uint64_t end);

  // Starts streams for the uncached blocks of [begin, end) that no stream
  // covers; with the object's size unknown, a stream for the whole chunk if
  // none runs. Requires context.mu held.
  void cover_locked(uint64_t begin, uint64_t end);

  // Ends every wait on this fetch with kCancelled (the chunker's cancel()).
  // Requires context.mu held, and context.stop requested.
  void cancel_waiters_locked();

  // Requires context.mu held.
  bool finished_locked() const {
    context_.mu.assert_held();
    return streams_.empty();
  }
  // The error of the last stream that failed, if any. Requires context.mu.
  const Status& last_error_locked() const {
    context_.mu.assert_held();
    return last_error_;
  }

 private:
  friend class FetchStream;

  struct Waiter {
    uint64_t begin;
    uint64_t end;
    Clock::time_point since;  // when it began to wait
    bool done = false;
    Status status;  // set with done
  };

  // Under `split`, cuts the stream that covers the first missing block of
  // [begin, end) if a new stream would bring the range sooner.
  void maybe_split_locked(uint64_t begin, uint64_t end) REQUIRES(context_.mu);
  void start_stream_locked(uint64_t begin, uint64_t end) REQUIRES(context_.mu);
  // The running stream whose range holds `offset`, or nullptr.
  FetchStream* stream_covering_locked(uint64_t offset) const REQUIRES(context_.mu);
  // Ends the waits of waiters whose ranges are cached.
  void wake_cached_locked();
  // How many readers wait on this chunk. Requires context_.mu held.
  size_t waiters_locked() const;
  // The end of the first waiter ending in (position, limit], or `limit`.
  uint64_t next_wake_locked(uint64_t position, uint64_t limit) const;
  // Called by a stream when it is over, with the status it ended with.
  void stream_ended(FetchStream& stream, const Status& status);

  FetchContext& context_;
  const uint64_t chunk_;

  // State below is protected by context_.mu.
  CondVar cv_;
  std::vector<std::shared_ptr<FetchStream>> streams_ GUARDED_BY(context_.mu);  // running
  std::multimap<uint64_t, Waiter*> waiters_ GUARDED_BY(context_.mu);  // by the end of their range
  Status last_error_ GUARDED_BY(context_.mu);
};

// One range stream of a chunk fetch. Runs on a thread of its own.
class FetchStream {
 public:
  FetchStream(std::shared_ptr<ChunkFetch> fetch, uint64_t begin, uint64_t end,
              Clock::time_point deadline);

  // Streams the range to its (possibly cut) end, then reports to the fetch.
  void run();

 private:
  friend class ChunkFetch;

  Status stream();
  // Records that bytes up to `position` have arrived; marks the blocks
  // wholly written and wakes waiters if `publish` (always at the end).
  void advance(uint64_t position, bool publish);
  // Stops counting as busy once the rest of the stream will take less than
  // a new request's time to first byte, and lets readahead start the next.
  // Requires context.mu held.
  void release_if_ending_locked() REQUIRES(context_.mu);

  const std::shared_ptr<ChunkFetch> fetch_;
  FetchContext& context_;
  const uint64_t begin_;
  const Clock::time_point deadline_;
  const IoContext io_;
  const std::string name_;  // "STORE: read KEY [begin, end)" for messages
  const Clock::time_point opened_at_;

  // Owned by the stream's thread.
  BlockCache* cache_ = nullptr;
  uint64_t marked_;  // blocks [begin_, marked_) are marked cached
  // Blocks past marked_ that were cached when the stream got there, so it
  // did not write them (sorted byte ranges, whole blocks): never marked by
  // this stream, since they may have been punched for space since.
  std::vector<std::pair<uint64_t, uint64_t>> skipped_;

  // Protected by context.mu: the cache's drops() when this stream last
  // marked blocks (or began).
  uint64_t drops_seen_ GUARDED_BY(context_.mu) = 0;

  // State below is protected by context.mu (written by the stream's thread,
  // read by callers planning streams).
  // Not declared GUARDED_BY: the fetch reads them through its streams'
  // pointers, which the analysis cannot tie to the lock the fetch holds, and
  // the stream's thread reads position_ without it, as its only writer.
  uint64_t requested_end_;  // the end asked of the store (clipped to the object)
  uint64_t end_;            // where the stream stops: requested_end_ or a cut
  uint64_t position_;       // bytes [begin_, position_) have arrived
  uint64_t reading_until_;  // the end of the read in flight
  std::optional<Clock::time_point> first_byte_at_;
  bool busy_ = true;  // counted in context.busy_streams (see fetch_context.h)
};

}  // namespace lazyblock
