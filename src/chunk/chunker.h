// Chunker: serves reads of one immutable object through a local block cache,
// fetching the 4 MiB chunks it lacks from a store.
//
// Data flow: read_at/slice/write_to -> is every block of the range cached?
// yes: served from the cache map without a lock. No: for each chunk the range
// touches, make sure a stream is fetching each missing block (never two
// streams for one block), and wait until the blocks of the range are cached,
// or a stream that was to deliver them has failed, or the deadline has
// passed. The fetch strategy decides only how streams are scheduled and when
// waiters are woken:
//   full       one stream per chunk; blocks are published and waiters woken
//              when the whole chunk has arrived (E2B's FullFetchChunker).
//   streaming  one stream per chunk from its first missing block; blocks are
//              published as they arrive and each waiter is woken as soon as
//              its own range is in (E2B's StreamingChunker).
//   split      as streaming, but a waiter whose bytes a running stream would
//              bring later than a new request would (judged from the store's
//              observed time to first byte and bandwidth) gets a new stream
//              from its block on, and the running stream is cut there, so
//              that no byte is fetched twice and the chunk still completes.
// Errors: a failed stream wakes the waiters it was to serve; each returns OK
// if the bytes it needs arrived before the failure, else the stream's error. Nothing is marked
// cached that was not wholly written, so a later read fetches again.
//
// The object's size may be unknown at creation: the first fetch learns it
// from the range response, and the cache is created then. Reads past the end
// are clipped; empty reads never touch the store.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "common/byte_sink.h"
#include "common/status.h"
#include "storage/object_store.h"

namespace lazyblock {

enum class FetchStrategy { kFull, kStreaming, kSplit };

// "full", "streaming" or "split".
Result<FetchStrategy> parse_fetch_strategy(std::string_view name);
std::string_view fetch_strategy_name(FetchStrategy strategy);

struct ChunkerOptions {
  FetchStrategy strategy = FetchStrategy::kSplit;  // the fastest in bench fetch
  uint64_t block_size = 4096;                      // unit of caching
  uint64_t chunk_size = 4 * 1024 * 1024;           // unit of fetching; a multiple of block_size
  std::chrono::nanoseconds fetch_timeout = std::chrono::seconds(60);  // deadline per fetch
  std::filesystem::path cache_dir;  // where the cache file lives; empty: $TMPDIR or /tmp

  // split: at most this many streams fill one chunk at once, and this many
  // run in the whole chunker, counting every strategy's streams.
  int max_streams_per_chunk = 8;
  int max_streams = 64;
  // Sequential reads (write_to, and runs of read_at/slice each starting where
  // the last ended) keep this many streams transferring ahead of the reader:
  // the next chunk's request goes out one time-to-first-byte before a stream
  // ends, so the wait for its first byte overlaps the others' transfers.
  int parallel = 8;
  // Whether runs of sequential read_at/slice grow a readahead window (from
  // 1 MiB, doubling per read up to 2 x parallel chunks). Random reads
  // never read ahead; write_to always does.
  bool readahead = true;
  // For a reader that reads each byte once, in order, and asks for its own
  // readahead with prefetch() (cat, export): the blocks read_at has copied
  // out are given back to the filesystem at once (BlockCache::release), so
  // that the cache holds only what lies between the reader and its
  // readahead. Reading them again fetches them again.
  bool drop_behind = false;
  // First guesses at the store's time to first byte and per-stream bandwidth,
  // refined by what streams observe; the split strategy plans with them.
  std::chrono::nanoseconds expected_ttfb = std::chrono::milliseconds(20);
  double expected_bandwidth = 100e6;  // bytes per second
};

// Counters of upstream traffic and of callers waiting, for benchmarks,
// metrics and tests.
struct ChunkerStats {
  uint64_t requests = 0;  // range streams opened (including failed opens)
  uint64_t bytes = 0;     // bytes received from the store
  uint64_t waiting = 0;   // callers waiting on a fetch right now
  uint64_t streams = 0;   // streams running right now
};

class Chunker {
 public:
  virtual ~Chunker() = default;

  // The object's size (learned from the store if not yet known).
  virtual Result<uint64_t> size() = 0;

  // A view of [offset, offset + length) clipped to the object's end. Waits
  // until those bytes are cached. The view's bytes stay cached until the
  // calling thread asks any chunker for another view (they are pinned for
  // the thread: the cache gives back the space of unpinned blocks only,
  // when its filesystem is full); read it before then. Its memory stays
  // mapped for the chunker's lifetime.
  virtual Result<std::span<const std::byte>> slice(uint64_t offset, uint64_t length) = 0;
  // The same view (pinned the same way) if every block of the range is
  // cached now, else nullopt (also while the size is unknown or past the
  // end): never waits, never fetches, takes no lock. A page-fault handler's
  // fast path.
  virtual std::optional<std::span<const std::byte>> cached_slice(uint64_t offset,
                                                                 uint64_t length) = 0;
  // Copies [offset, offset + buffer.size()) into `buffer` if the range lies
  // inside the object, every block of it is cached now, and the copy holds
  // (BlockCache::copy_holds); false otherwise (nothing is fetched). Never
  // waits but for a punch or a write's check after a cut, takes no lock. A
  // page-fault handler's fast path: unlike a view, a copy checked this way
  // is never the hole of a cache file cut short under it.
  virtual bool read_cached(std::span<std::byte> buffer, uint64_t offset) = 0;

  // Copies [offset, offset + buffer.size()) clipped to the object's end into
  // `buffer`; returns the count copied (less than asked only at the end).
  virtual Result<size_t> read_at(std::span<std::byte> buffer, uint64_t offset) = 0;

  // Writes [offset, offset + length) clipped to the object's end to `sink`
  // once it is all cached, straight from the cache's map
  // (ByteSink::write_from_mapping: no copy in between for a file
  // descriptor); returns the count written (less than asked only at the
  // end). A cache file that fails under the write loses the blocks not yet
  // written: they are fetched once more and written after the bytes that
  // went out. A second failure, or a drop of the cache during the write
  // (the bytes out may be the hole it left), is an I/O error naming the
  // object and the range. With drop_behind, the blocks are given back once
  // written.
  virtual Result<size_t> write_range_to(ByteSink& sink, uint64_t offset, uint64_t length) = 0;

  // Writes the whole object to `sink` in order.
  virtual Status write_to(ByteSink& sink) = 0;

  // Asks for [offset, offset + length) to be fetched ahead of its reads,
  // without waiting: queued behind earlier requests and started as
  // readahead is (parallel at a time). Failures surface to whoever
  // reads those bytes. Ranges past the end are ignored.
  virtual void prefetch(uint64_t offset, uint64_t length) = 0;

  virtual ChunkerStats stats() const = 0;

  // Stops every fetch in flight at once and refuses new ones, for a server
  // that is shutting down: callers waiting on fetches return kCancelled now,
  // whatever the store does, and so does every later read of an uncached
  // byte (cached bytes are still served). Thread-safe; cannot be undone.
  virtual void cancel() = 0;
};

// A chunker for the object `key` of `store`. `size`, when given, saves the
// first fetch from having to learn it. Fails on inconsistent options.
Result<std::unique_ptr<Chunker>> make_chunker(std::shared_ptr<ObjectStore> store, std::string key,
                                              std::optional<uint64_t> size, ChunkerOptions options);

}  // namespace lazyblock
