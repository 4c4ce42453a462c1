// FetchingChunker: the Chunker over an ObjectStore, for every fetch strategy.
// See chunker.h for the behaviour and fetch_session.h for the streams.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "chunk/chunker.h"
#include "chunk/fetch_session.h"
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
  // Starts a fetch of `chunk` unless it is cached or being fetched; returns
  // the session in flight, if any. Requires context_.mu held.
  std::shared_ptr<FetchSession> start_fetch_locked(uint64_t chunk);
  // Caches the object's size from stat() (one round trip, no data).
  Result<uint64_t> stat_size();

  FetchContext context_;
  TaskGroup tasks_;  // the sessions' threads; declared last, so waited for first
};

}  // namespace lazyblock
