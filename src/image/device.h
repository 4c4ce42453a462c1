// image::Device: a build's device (its memfile or rootfs) as the bytes a VM
// sees, assembled from the data files of the build and its ancestors: the
// read-only Disk (disk.h).
//
// Data flow: at open, the header's mappings become an immutable extent
// table (begin, end, the chunker of the data file or zeros, the storage
// offset), with every chunker created then (BUILD/NAME of each build, one
// chunker per data file, shared through a DataFiles; plain or framed as the
// header's BuildInfo says). A read finds its first extent by binary search,
// takes no lock of the device's, and splits along the extents; each piece is
// read from its chunker, and zero pieces are zeros without any fetch.
// write_to walks the extents in order, asking the chunkers to prefetch the
// ranges coming up, so that several data files stream at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "chunk/chunker.h"
#include "common/byte_sink.h"
#include "common/mutex.h"
#include "image/disk.h"
#include "image/header.h"
#include "storage/object_store.h"

namespace lazyblock::image {

// "BUILD/NAME", the key of a build's data file; "BUILD/NAME.header", its header.
std::string data_key(const Uuid& build, const std::string& name);
std::string header_key(const Uuid& build, const std::string& name);

// The whole of a small object (`key` of at most `max_bytes`): a header, a
// page record. kCorruption if it is larger, or shorter than the store said.
Result<std::vector<std::byte>> read_small_object(ObjectStore& store, const std::string& key,
                                                 uint64_t max_bytes,
                                                 std::chrono::nanoseconds timeout);

// Reads and parses the header of `name` of `build` (at most kMaxHeaderBytes).
Result<Header> load_header(ObjectStore& store, const Uuid& build, const std::string& name,
                           std::chrono::nanoseconds timeout);

// The chunkers of data files, one per (build, name), created on first use
// and shared by every device that maps into them. Thread-safe.
class DataFiles {
 public:
  DataFiles(std::shared_ptr<ObjectStore> store, ChunkerOptions options);

  // The chunker of `build`'s data file `name`. How that file is stored
  // (plain, or zstd/LZ4 frames) comes from `referrer`, the header of the
  // device that reads it, or, where that header has no entry for the build,
  // from the build's own header. The first device to ask decides the frames
  // the chunker knows (a header lists only the frames its mappings reach).
  Result<Chunker*> chunker(const Uuid& build, const std::string& name, const Header& referrer);
  ObjectStore& store() { return *store_; }
  const ChunkerOptions& options() const { return options_; }
  // Upstream traffic of every data file so far, by build.
  std::map<Uuid, ChunkerStats> stats() const;
  // Cancels every data file's fetches (Chunker::cancel), those opened later
  // too: a server's shutdown, which must not wait for a slow store.
  void cancel();

 private:
  const std::shared_ptr<ObjectStore> store_;
  const ChunkerOptions options_;
  mutable Mutex mu_;
  bool cancelled_ GUARDED_BY(mu_) = false;
  std::map<std::pair<Uuid, std::string>, std::unique_ptr<Chunker>> chunkers_ GUARDED_BY(mu_);
};

class Device final : public Disk {
 public:
  // The device `name` of `build`: loads its header from the files' store.
  static Result<std::unique_ptr<Device>> open(std::shared_ptr<DataFiles> files, const Uuid& build,
                                              std::string name);
  // A device from a header already in hand: resolves it into the extent
  // table, creating the chunker of every data file it maps into (a data
  // file whose chunker cannot be made fails the reads that need it).
  Device(std::shared_ptr<DataFiles> files, Header header, std::string name);

  // Learns the size of every data file the header maps into now (a stat
  // each, all at once), so that a server's first reads do not wait for it
  // on their way. Fails if a data file is missing.
  Status learn_sizes();

  const Header& header() const { return header_; }
  const std::string& name() const { return name_; }
  Readahead readahead() const override;

 private:
  // A data file the header maps into, resolved at open.
  struct Source {
    Uuid build;
    Chunker* chunker = nullptr;  // null: `error` says why there is none
    Status error;
  };
  // [begin, end) of the device: zeros (source null), or the bytes of
  // `source` from `storage_offset` on. Sorted, contiguous, covering the
  // device; immutable after construction, so reads search it without a lock.
  struct Extent {
    uint64_t begin;
    uint64_t end;
    const Source* source;
    uint64_t storage_offset;  // of `begin` in the source's data file
  };

  // The extent holding byte `offset` (< size()).
  const Extent& extent_at(uint64_t offset) const;
  // The source's chunker, or its error.
  Result<Chunker*> chunker_of(const Source& source) const;
  Status short_data_file(const Extent& extent, uint64_t stored_end, uint64_t device_end) const;
  // Splits [offset, offset + buffer.size()) along the extents: zeros are
  // filled in here, each piece stored in a data file goes to
  // `copy_stored(extent, piece, position)`, which returns false to stop.
  // Whether every piece was copied.
  template <typename CopyStored>
  bool copy_pieces(std::span<std::byte> buffer, uint64_t offset, CopyStored copy_stored) const;

  Status do_read(std::span<std::byte> buffer, uint64_t offset) override;
  Result<std::optional<std::span<const std::byte>>> do_view(uint64_t offset,
                                                            uint64_t length) override;
  std::optional<std::span<const std::byte>> do_cached_view(uint64_t offset,
                                                           uint64_t length) override;
  bool do_read_cached(std::span<std::byte> buffer, uint64_t offset) override;
  bool do_is_zero(uint64_t offset, uint64_t length) override;
  void do_prefetch(uint64_t offset, uint64_t length) override;
  Status do_extents(uint64_t offset, uint64_t length, std::vector<DiskExtent>& out) override;

  const std::shared_ptr<DataFiles> files_;
  const Header header_;
  const std::string name_;
  std::vector<Source> sources_;  // built before extents_, which point into it
  std::vector<Extent> extents_;
  // Where extent_at's binary search starts: the device in buckets of
  // 2^bucket_shift_ bytes (about one per extent), and for each the index of
  // the extent holding its first byte. A search spans only the extents of
  // one bucket, often one, so a fault's lookup costs no chain of
  // unpredictable branches.
  unsigned bucket_shift_ = 0;
  std::vector<uint32_t> bucket_first_;
};

}  // namespace lazyblock::image
