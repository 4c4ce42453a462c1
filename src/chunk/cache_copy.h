// Copies out of a chunker's block cache: the one way both chunkers serve
// read_at and write_range_to (chunker.h gives the contract).
//
// Fetch what is missing and pin it, note the cache's drops, copy straight
// from the map, and ask the cache whether the copy holds
// (BlockCache::copy_holds): a drop during the copy, or a write under way
// over a cut file, means the bytes copied may be the hole a cut file left.
// A buffer is then copied
// again; bytes already written to a sink cannot be taken back, so that is an
// I/O error. A map that faults under the copy (a disk error, a file cut
// short) loses the blocks not yet copied: they are dropped, fetched once more
// and copied after the bytes that went out; a second failure is an I/O
// error naming the object and the range.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>

#include "cache/block_cache.h"
#include "common/byte_sink.h"
#include "common/status.h"

namespace lazyblock {

// What a chunker lends the copies: its fetches and its way of forgetting
// lost blocks.
class CachedRanges {
 public:
  virtual ~CachedRanges() = default;
  // Makes every block of [offset, end) cached, fetching what is not, and
  // pins them.
  virtual Result<BlockCache::Pin> fetch_pinned(uint64_t offset, uint64_t end) = 0;
  // Forgets the blocks of [offset, end), which could not be read, so that
  // the next fetch_pinned fetches them again (a chunker of frames forgets
  // the whole frames they lie in).
  virtual void drop_lost(uint64_t offset, uint64_t end) = 0;
};

// Copies [offset, offset + out.size()) of `key` (all of it cached once
// fetched, inside the object) into `out`; returns out.size().
Result<size_t> read_through_cache(CachedRanges& ranges, const BlockCache& cache,
                                  std::string_view key, std::span<std::byte> out, uint64_t offset);

// Copies [offset, offset + out.size()) (inside the object) into `out` if
// every block of it is cached now and the copy reads back whole and holds;
// false otherwise. Never fetches, never waits but for a punch in progress
// or the check of a write over a cut file: a page fault's fast path, whose
// copy, once installed in a VM, cannot be taken back.
bool copy_if_cached(const BlockCache& cache, std::span<std::byte> out, uint64_t offset);

// Writes [offset, end) of `key` (inside the object) to `sink` from the map;
// returns end - offset.
Result<size_t> write_through_cache(CachedRanges& ranges, const BlockCache& cache,
                                   std::string_view key, ByteSink& sink, uint64_t offset,
                                   uint64_t end);

}  // namespace lazyblock
