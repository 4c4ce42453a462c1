// FetchingChunker: the Chunker over an ObjectStore, for every fetch strategy.
// See chunker.h for the behaviour and chunk_fetch.h for the streams.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "chunk/chunker.h"
#include "chunk/chunk_fetch.h"
#include "chunk/fetch_context.h"
#include "common/task_group.h"

namespace lazyblock {

class FetchingChunker final : public Chunker {
 public:
  FetchingChunker(std::shared_ptr<ObjectStore> store, std::string key, ChunkerOptions options);
  // Stops the fetches in flight and waits for them.
  ~FetchingChunker() override;

  // Creates the cache for a known size up front. Called once, before use.
  Status set_size(uint64_t size);

  Result<uint64_t> size() override;
  Result<std::span<const std::byte>> slice(uint64_t offset, uint64_t length) override;
  Result<size_t> read_at(std::span<std::byte> buffer, uint64_t offset) override;
  Status write_to(ByteSink& sink) override;
  ChunkerStats stats() const override;

 private:
  // The object's size; if unknown, learned by fetching the chunk holding
  // `offset` (which a read of `offset` needs anyway), or by stat() if that
  // offset lies past the end.
  Result<uint64_t> learn_size(uint64_t offset);
  // Makes every block of [offset, end) cached (end <= size).
  Status fetch_range(uint64_t offset, uint64_t end);
  // The fetch of `chunk` in flight, or a new one (with no stream yet).
  // Requires context_.mu held.
  std::shared_ptr<ChunkFetch> fetch_locked(uint64_t chunk);
  // Starts fetching the missing blocks of `chunk` that no stream covers.
  // Requires context_.mu held.
  void prefetch_locked(uint64_t chunk);
  // Caches the object's size from stat() (one round trip, no data).
  Result<uint64_t> stat_size();

  mutable FetchContext context_;
  TaskGroup tasks_;  // the streams' threads; declared last, so waited for first
};

}  // namespace lazyblock
