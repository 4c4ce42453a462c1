// DiskCacheStore: a persistent read-through cache of whole chunks in a
// directory on a local disk or a shared NFS mount (`--cache-dir`), shared by
// every lazyblock process that points at it.
//
// Reads: each chunk of a range is served from its file in the directory if
// one is there and is the right one (below); the rest of the range comes
// from the store below, in one stream, whose bytes are written through into
// the chunks' files while the caller is served.
//
// Identity: a chunk file says whose bytes it holds — the store (its
// location(), e.g. "file:///data" or "s3://bucket/prefix (endpoint)"), the
// key, the chunk's index and size, the object's size and version (ETag,
// Last-Modified, GCS generation, a file's inode and mtime; see ObjectInfo) —
// and is served only for exactly that. Once per process per object the size
// and version are learned from the store with the request that learns the
// size anyway: a stat() passing through, or the first range opened below;
// only when the first read of an object would be a hit is a stat_info() sent
// for it. A file for anything else (another store, another index, an object
// re-packed or resized since) is a miss: dropped and fetched again, never
// served. A store that gives no version leaves only the size to tell two
// versions of an object apart.
//
// Publishing: a chunk's file appears under its final name only whole and
// verified. Bytes go to a temporary file of this process (several streams of
// one chunk share it, so a chunk fetched in split streams completes too), and
// when every byte of the chunk has arrived the file gets its trailer, is
// synced, and is renamed into place, atomically. The object's last chunk is
// published only once a stream has reached the object's end and found nothing
// more, so a store that misreports the size cannot leave a wrong last chunk.
// A reader checks the trailer against what it wants, and the checksum (once
// per file per process); a corrupt or truncated file is dropped and fetched
// again. Failing to write the cache (a full disk) is logged and never fails a
// read.
//
// Temporary files: named after their chunk and the owner's pid, and held
// under an exclusive flock() by their owner for as long as it has them open
// (the lock dies with the process, whatever pid comes next). A process
// removes its own temporary files on every path it controls (a chunk never
// completed, a failed write, destruction; idle partial chunks beyond a few
// are given up); a temporary file whose lock can be taken belongs to a dead
// process and is removed at open and at every later scan. (On NFS, flock is
// a lock on the server, across hosts.)
//
// Size: at open, and whenever the files exceed max_bytes, the least recently
// used (by modification time, which a first read per process refreshes) are
// removed down to 90% of it, so a lower --cache-size trims an existing
// directory at once.
//
// Layout (format 2):
//   DIR/<h[0:2]>/<h>.<chunk size>.<chunk index>.c2
//     h: 32 hex digits of XXH3-128 over the store's location and the key
//        (each as a u64 little-endian length, then its bytes)
//   DIR/<h[0:2]>/<h>.<chunk size>.<chunk index>.c2.tmp.<pid>.<sequence>
//     a file being filled (above)
// Files of format 1 (`<h>.<chunk size>.<chunk index>`, whose name and
// trailer said nothing of the store or version) are removed at open.
// A chunk file is the chunk's data (chunk size bytes; the object's last
// chunk fewer), then a 64-byte trailer, little-endian:
//    0  u8[8]   magic "LBCHUNK\0"
//    8  u32     trailer version (2)
//   12  u32     trailer size (64)
//   16  u64     chunk index
//   24  u64     chunk size
//   32  u64     object size
//   40  u64[2]  object identity: XXH3-128 (low half first) over the store's
//               location, the key and the object's version (each as a u64
//               length, then its bytes)
//   56  u64     checksum: XXH3-64 over the chunk's data followed by trailer
//               bytes [0, 56)
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>

#include "common/mutex.h"
#include "common/unique_fd.h"
#include "storage/object_store.h"

namespace lazyblock {

struct DiskCacheOptions {
  std::filesystem::path dir;
  uint64_t chunk_size = 4 * 1024 * 1024;
  uint64_t max_bytes = 16ULL * 1024 * 1024 * 1024;
};

class DiskCacheStore final : public StoreLayer {
 public:
  // Creates `options.dir` if missing, removes what no process can use any
  // more (temporary files of dead processes, files of an older format) and
  // trims it to `options.max_bytes`; fails if it cannot be used.
  static Result<std::shared_ptr<DiskCacheStore>> open(std::shared_ptr<ObjectStore> inner,
                                                      DiskCacheOptions options);
  // Removes this process's temporary files; logs the counters at info.
  ~DiskCacheStore() override;

  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;
  std::string describe() const override;

  // For tests and metrics.
  struct Counters {
    uint64_t chunk_hits = 0;       // chunks served from the directory
    uint64_t upstream_ranges = 0;  // ranges opened in the store below
    uint64_t upstream_stats = 0;   // stats (size and version) asked of the store below
    uint64_t chunks_published = 0;
    uint64_t stale_dropped = 0;    // files for another store, key, index, size or version
    uint64_t corrupt_dropped = 0;  // files that failed verification
    uint64_t temps_removed = 0;    // temporary files of dead processes
    uint64_t evicted = 0;
  };
  Counters counters() const;

  // The final path of chunk `index` of `key`.
  std::filesystem::path chunk_path(const std::string& key, uint64_t index) const;

 private:
  class Reader;
  class PartialChunk;
  struct ObjectId {
    uint64_t low = 0;
    uint64_t high = 0;
    bool operator==(const ObjectId&) const = default;
  };

  DiskCacheStore(std::shared_ptr<ObjectStore> inner, DiskCacheOptions options);

  // The identity a chunk file of `key` at version `info` must carry.
  ObjectId object_id(const std::string& key, const ObjectInfo& info) const;
  // How many data bytes chunk `index` of an object of `object_size` has.
  uint64_t chunk_length(uint64_t index, uint64_t object_size) const;
  // Records what the store below said of `key` (logged if it changed).
  void note_info(const std::string& key, const ObjectInfo& info);
  std::optional<ObjectInfo> known_info(const std::string& key) const;
  // Opens a range in the store below, counted, noting what it says of `key`.
  Result<std::unique_ptr<RangeReader>> open_upstream(const std::string& key, uint64_t offset,
                                                     uint64_t length, const IoContext& io);

  // An open descriptor of chunk `index` of `key` at `info` if its file is
  // there and is that chunk, whole and intact; no descriptor otherwise (a
  // file that is not is removed).
  UniqueFd open_cached(const std::string& key, uint64_t index, const ObjectInfo& info);

  // The partial file of chunk `index` of `key` at `info`, shared by this
  // process's streams; nullptr if it cannot be created (logged).
  std::shared_ptr<PartialChunk> partial(const std::string& key, uint64_t index,
                                        const ObjectInfo& info);
  // Called by a partial chunk's writer once it is whole (and, for the
  // object's last chunk, confirmed by a clean end of stream).
  void publish(const std::string& key, uint64_t index, PartialChunk& chunk);
  // Gives up `chunk` (a write to it failed): its temporary file goes.
  void forget(const PartialChunk& chunk);
  // Gives up the least recently used partial chunks no stream holds, beyond
  // a few. Requires mu_ held.
  void trim_idle_partials_locked() REQUIRES(mu_);
  // Scans the directory: removes temporary files of dead processes and files
  // of older formats, learns the total, and removes the least recently used
  // files while over budget. Requires mu_ held.
  void evict_locked() REQUIRES(mu_);

  const DiskCacheOptions options_;
  const std::string location_;  // the store below's location(): part of every identity

  mutable Mutex mu_;
  // Partial chunks by final path and identity; guarded by mu_.
  std::map<std::string, std::shared_ptr<PartialChunk>> partials_ GUARDED_BY(mu_);
  uint64_t partial_uses_ GUARDED_BY(mu_) = 0;  // a clock for trimming idle partials
  // What the store below said of each object, in this process; guarded by mu_.
  std::map<std::string, ObjectInfo> known_ GUARDED_BY(mu_);
  // Files whose checksum this process verified: path -> (inode, mtime).
  std::map<std::filesystem::path, std::pair<uint64_t, int64_t>> verified_ GUARDED_BY(mu_);
  uint64_t total_bytes_ GUARDED_BY(mu_) = 0;  // of final files, as of the last scan plus publishes
  Counters counters_ GUARDED_BY(mu_);
};

}  // namespace lazyblock
