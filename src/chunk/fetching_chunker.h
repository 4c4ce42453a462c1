// FetchingChunker: the Chunker over an ObjectStore, for every fetch strategy.
// See chunker.h for the behaviour and chunk_fetch.h for the streams.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <optional>
#include <string>

#include "chunk/cache_copy.h"
#include "chunk/chunk_fetch.h"
#include "chunk/chunker.h"
#include "chunk/fetch_context.h"
#include "common/task_group.h"

namespace lazyblock {

class FetchingChunker final : public Chunker, private CachedRanges {
 public:
  FetchingChunker(std::shared_ptr<ObjectStore> store, std::string key, ChunkerOptions options);
  // Stops the fetches in flight and waits for them.
  ~FetchingChunker() override;

  // Creates the cache for a known size up front. Called once, before use.
  Status set_size(uint64_t size);

  Result<uint64_t> size() override;
  Result<std::span<const std::byte>> slice(uint64_t offset, uint64_t length) override;
  std::optional<std::span<const std::byte>> cached_slice(uint64_t offset, uint64_t length) override;
  bool read_cached(std::span<std::byte> buffer, uint64_t offset) override;
  Result<size_t> read_at(std::span<std::byte> buffer, uint64_t offset) override;
  Result<size_t> write_range_to(ByteSink& sink, uint64_t offset, uint64_t length) override;
  Status write_to(ByteSink& sink) override;
  void prefetch(uint64_t offset, uint64_t length) override;
  ChunkerStats stats() const override;
  void cancel() override;

 private:
  // The object's size; if unknown, learned by fetching the chunk holding
  // `offset` (which a read of `offset` needs anyway), or by stat() if that
  // offset lies past the end.
  Result<uint64_t> learn_size(uint64_t offset);
  // Makes every block of [offset, end) cached (end <= size).
  Status fetch_range(uint64_t offset, uint64_t end);
  // fetch_range, then a pin on the range once it is cached (a cache short
  // of space may give blocks back between the two: they are fetched again).
  Result<BlockCache::Pin> fetch_pinned(uint64_t offset, uint64_t end) override;
  void drop_lost(uint64_t offset, uint64_t end) override;
  // What a read gets when its blocks keep being given back for space.
  Status evicted_status(uint64_t offset, uint64_t end) const;
  // Grows the readahead window of the run that a read of [offset, end)
  // continues (or starts a run, in place of the oldest), and reads ahead if
  // the window has moved into a chunk not yet asked for.
  void note_read(uint64_t offset, uint64_t end);
  // Caches the object's size from stat() (one round trip, no data).
  Result<uint64_t> stat_size();

  mutable FetchContext context_;
  // A run of sequential reads: each read starting where the last ended
  // grows its window. Read and written without a lock, so that a hit stays
  // lock-free (a lost update only delays or resets readahead).
  struct SequentialRun {
    std::atomic<uint64_t> end{UINT64_MAX};          // where its next read would start
    std::atomic<uint64_t> window{0};                // 0: one read so far
    std::atomic<uint64_t> until_chunk{UINT64_MAX};  // its window's end chunk
  };
  // Runs followed at once: readers of several regions (nbdcopy's threads,
  // a guest's files) each keep their readahead when their reads interleave.
  static constexpr size_t kSequentialRuns = 4;
  std::array<SequentialRun, kSequentialRuns> runs_;
  std::atomic<uint32_t> next_run_{0};  // the slot a new run takes (round robin)
  TaskGroup tasks_;                    // the streams' threads; declared last, so waited for first
};

}  // namespace lazyblock
