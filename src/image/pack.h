// image::pack: turns a raw image (a disk or a memory file) into a build:
// its data file holding only the blocks it changed, and its header mapping
// every block of the device.
//
// Data flow: the source is read in batches; each block (the last one padded
// with zeros) is classified: all zeros -> mapped to nil (stored nowhere);
// equal to the parent device's block -> mapped where the parent maps it;
// else -> appended to the new data file and mapped there. Neighbouring
// blocks with the same source join into one mapping. The data file goes to
// the store first, then the header, so a build is never visible without its
// data.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>

#include "image/device.h"
#include "image/header.h"

namespace lazyblock::image {

struct PackOptions {
  Uuid build;
  std::optional<Uuid> parent;  // diff against this build's device of the same name
  std::string name;            // "memfile", "rootfs.ext4", ...
  // Unit of diffing and mapping; unset: the parent's, or 4096 without one.
  std::optional<uint64_t> block_size;
  // Replace a build whose header exists already (its children and any cache
  // of it then disagree with it: see `pack --help`).
  bool force = false;
  // Requested when the pack should end early (SIGINT): the upload in flight
  // is abandoned (aborted, for a multipart upload) and nothing is stored.
  std::stop_token stop;
  std::filesystem::path temp_dir;  // where the data file is assembled; empty: $TMPDIR or /tmp
  // Instead of a raw image: a kept overlay of the parent's disk (`serve nbd
  // --overlay`). Only its blocks are read; every other block keeps the
  // parent's mapping.
  std::optional<std::filesystem::path> overlay;
};

struct PackSummary {
  Header header;
  uint64_t blocks = 0;     // in the device
  uint64_t changed = 0;    // stored in the new data file
  uint64_t zero = 0;       // mapped to nil
  uint64_t unchanged = 0;  // mapped into an ancestor's data file
  uint64_t data_bytes = 0;    // the new data file's size
  uint64_t header_bytes = 0;  // the new header's size
  std::optional<uint64_t> parent_size;  // the parent device's size, if there is a parent
};

// Packs the bytes readable from `source_fd` (to its end; unused with
// options.overlay) as device `options.name` of build `options.build`, stored
// through `files`' store.
// `progress`, if set, hears of the bytes read so far.
Result<PackSummary> pack(const std::shared_ptr<DataFiles>& files, int source_fd, const PackOptions& options,
                         const std::function<void(uint64_t bytes_read)>& progress);

}  // namespace lazyblock::image
