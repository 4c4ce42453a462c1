// image::Device: a build's device (its memfile or rootfs) as the bytes a VM
// sees, assembled from the data files of the build and its ancestors.
//
// Data flow: a read of [offset, offset + length) is split along the header's
// mappings; each piece is read from the chunker of the data file its mapping
// names (BUILD/NAME of that build, one chunker per data file, shared through
// a DataFiles), and nil pieces are zeros without any fetch. write_to walks
// the mappings in order, asking each chunker to prefetch the ranges coming
// up, so that several data files stream at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "chunk/chunker.h"
#include "common/byte_sink.h"
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
  mutable std::mutex mu_;
  bool cancelled_ = false;  // guarded by mu_
  std::map<std::pair<Uuid, std::string>, std::unique_ptr<Chunker>> chunkers_;  // guarded by mu_
};

class Device {
 public:
  // The device `name` of `build`: loads its header from the files' store.
  static Result<std::unique_ptr<Device>> open(std::shared_ptr<DataFiles> files, const Uuid& build,
                                              std::string name);
  // A device from a header already in hand.
  Device(std::shared_ptr<DataFiles> files, Header header, std::string name);

  // Learns the size of every data file the header maps into now (a stat
  // each, all at once), so that a server's first reads do not wait for it
  // on their way. Fails if a data file is missing.
  Status learn_sizes();

  const Header& header() const { return header_; }
  uint64_t size() const { return header_.size; }
  const std::string& name() const { return name_; }

  // Copies [offset, offset + buffer.size()) clipped to the device's end into
  // `buffer`; returns the count copied.
  Result<size_t> read_at(std::span<std::byte> buffer, uint64_t offset);

  // A view of [offset, offset + length) clipped to the end, valid for the
  // data files' lifetime, when one mapping holds the whole range (a page
  // fault's case; zeros come from a shared zero buffer of up to 2 MiB).
  // kInvalidArgument if the range crosses mappings: use read_at.
  Result<std::span<const std::byte>> slice(uint64_t offset, uint64_t length);

  // Whether every byte of [offset, offset + length) (clipped) lies in nil
  // ranges: zeros that need no fetch.
  bool is_zero(uint64_t offset, uint64_t length) const;

  // slice() without waiting: the view if one mapping holds the range and its
  // bytes are cached (or nil), else nullopt. Never waits on a fetch: a page
  // fault's fast path.
  std::optional<std::span<const std::byte>> cached_slice(uint64_t offset, uint64_t length);

  // Writes the whole device to `sink` in order; nil ranges as write_zeros.
  Status write_to(ByteSink& sink);

  // Starts fetching [offset, offset + length) (clipped) without waiting
  // (NBD's CACHE, and prefetch of a recorded working set).
  void prefetch(uint64_t offset, uint64_t length);

 private:
  // The chunker of the data file `mapping` (not nil) names.
  Result<Chunker*> chunker_for(const Mapping& mapping);

  const std::shared_ptr<DataFiles> files_;
  const Header header_;
  const std::string name_;
};

}  // namespace lazyblock::image
