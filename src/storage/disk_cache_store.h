// DiskCacheStore: a persistent read-through cache of whole chunks in a
// directory on a local disk or a shared NFS mount (`--cache-dir`), shared by
// every lazyblock process that points at it.
//
// Reads: each chunk of a range is served from its file in the directory if
// one is there and verifies; the rest of the range comes from the store
// below, in one stream, whose bytes are written through into the chunks'
// files while the caller is served.
//
// A chunk's file appears under its final name only whole and verified:
// bytes go to a temporary file of this process (several streams of one chunk
// share it, so a chunk fetched in split streams completes too), and when
// every byte of the chunk has arrived the file gets a trailer (the object's
// size and a checksum of the data), is synced, and is renamed into place,
// atomically. The object's last chunk is published only once a stream has
// reached the object's end and found nothing more, so a store that
// misreports the size cannot leave a wrong last chunk. A reader checks the
// trailer and checksum before trusting a file (once per file per process);
// a corrupt or truncated file is dropped and fetched again. Failing to write
// the cache (a full disk) is logged and never fails a read.
//
// Layout: DIR/<2 hex>/<32 hex of the key's hash>.<chunk size>.<chunk index>
// Trailer (32 bytes, little-endian): "LBCHUNK\0", u32 version (1),
// u32 reserved (0), u64 object size, u64 XXH3-64 of the chunk's data.
//
// Size: when the files exceed max_bytes, the least recently used (by
// modification time, which a read refreshes) are removed down to 90% of it,
// along with temporary files abandoned by processes that died.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include "storage/object_store.h"

namespace lazyblock {

struct DiskCacheOptions {
  std::filesystem::path dir;
  uint64_t chunk_size = 4 * 1024 * 1024;
  uint64_t max_bytes = 16ULL * 1024 * 1024 * 1024;
};

class DiskCacheStore final : public StoreLayer {
 public:
  // Creates `options.dir` if missing; fails if it cannot be used.
  static Result<std::shared_ptr<DiskCacheStore>> open(std::shared_ptr<ObjectStore> inner,
                                                      DiskCacheOptions options);
  ~DiskCacheStore() override;

  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;
  std::string describe() const override;

  // For tests and metrics.
  struct Counters {
    uint64_t chunk_hits = 0;       // chunks served from the directory
    uint64_t chunks_published = 0;
    uint64_t corrupt_dropped = 0;  // files that failed verification
    uint64_t evicted = 0;
  };
  Counters counters() const;

  // The final path of chunk `index` of `key`.
  std::filesystem::path chunk_path(const std::string& key, uint64_t index) const;

 private:
  class Reader;
  class PartialChunk;

  DiskCacheStore(std::shared_ptr<ObjectStore> inner, DiskCacheOptions options);

  // An open descriptor of chunk `index` of `key` if its file exists and
  // verifies, with the object's size from its trailer; nullopt otherwise
  // (a corrupt file is removed).
  struct CachedChunk {
    int fd;
    uint64_t object_size;
  };
  std::optional<CachedChunk> open_cached(const std::string& key, uint64_t index);

  // The partial file of chunk `index` of `key`, shared by this process's
  // streams; nullptr if it cannot be created (logged).
  std::shared_ptr<PartialChunk> partial(const std::string& key, uint64_t index,
                                        uint64_t object_size);
  // Called by a partial chunk once it is whole (and, for the object's last
  // chunk, confirmed by a clean end of stream).
  void publish(const std::string& key, uint64_t index, PartialChunk& chunk);
  void forget_partial(const std::filesystem::path& final_path);
  // Removes least recently used files while over budget. Requires mu_ held.
  void evict_locked();

  const DiskCacheOptions options_;

  mutable std::mutex mu_;
  std::map<std::filesystem::path, std::shared_ptr<PartialChunk>> partials_;  // guarded by mu_
  // Files verified by this process: path -> (inode, modification time).
  std::map<std::filesystem::path, std::pair<uint64_t, int64_t>> verified_;  // guarded by mu_
  std::optional<uint64_t> total_bytes_;  // of final files; scanned on first need; guarded by mu_
  Counters counters_;                    // guarded by mu_
};

}  // namespace lazyblock
