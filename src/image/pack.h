// image::pack: turns a raw image (a disk or a memory file) into a build:
// its data file holding only the blocks it changed, and its header mapping
// every block of the device.
//
// Data flow: the source is read in batches; each block (the last one padded
// with zeros) is classified: all zeros -> mapped to nil (stored nowhere);
// equal to the parent device's block -> mapped where the parent maps it;
// else -> appended to the new data file and mapped there. Neighbouring
// blocks with the same source join into one mapping. The data file is
// assembled in a local temporary file, plain or (with a codec) cut into
// frames that encoder threads compress in parallel (data_file_writer.h), and
// streamed from there to the store (in parts, for S3); then the header goes
// up, so a build is never visible without its data.
//
// Header versions: 3 for a plain build over plain ancestors; 4 (or 5, on
// request) when the build is compressed or maps into a compressed ancestor,
// recording for every build it names the data file's uncompressed size,
// SHA-256 (the new build's own) and frame table.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <stop_token>
#include <string>

#include "image/data_file_writer.h"
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
  // How the new data file is stored: codec kNone for BUILD/NAME, else
  // BUILD/NAME.zstd or .lz4 in frames of frame_size. `level` unset: the
  // codec's default.
  Codec codec = Codec::kNone;
  std::optional<int> level;
  uint64_t frame_size = 2 * 1024 * 1024;
  int encoder_threads = 0;  // 0: one per core
  // The header's version; unset: the parent's, but at least 4 for a
  // compressed build (3 without a parent and codec).
  std::optional<uint64_t> header_version;
};

struct PackSummary {
  Header header;
  uint64_t blocks = 0;                  // in the device
  uint64_t changed = 0;                 // stored in the new data file
  uint64_t zero = 0;                    // mapped to nil
  uint64_t unchanged = 0;               // mapped into an ancestor's data file
  uint64_t data_bytes = 0;              // the new data file's size, uncompressed
  uint64_t stored_bytes = 0;            // the data object's size (compressed, if it is)
  uint64_t header_bytes = 0;            // the new header's size
  std::string data_key;                 // where the data file went
  FrameTable frame_table;               // codec kNone: stored plain
  std::optional<uint64_t> parent_size;  // the parent device's size, if there is a parent
};

// Packs the bytes readable from `source_fd` (to its end; unused with
// options.overlay) as device `options.name` of build `options.build`, stored
// through `files`' store.
// `progress`, if set, hears of the bytes read so far.
Result<PackSummary> pack(const std::shared_ptr<DataFiles>& files, int source_fd,
                         const PackOptions& options,
                         const std::function<void(uint64_t bytes_read)>& progress);

}  // namespace lazyblock::image
