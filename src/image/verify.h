// image::verify_data_file: reads a build's whole data file from its store
// and checks it against what a header records of it (`inspect --verify`).
//
// Data flow: one range stream over the whole stored object, read in order.
// Plain: every byte goes into a SHA-256 and a count. Compressed: the stream
// is cut along the frame table; each frame's stored bytes are decompressed
// (which checks the frame's own checksum and its size) and the content goes
// into the SHA-256. At the end the size and SHA-256 are compared with the
// header's, where it records them and the table lists every frame (a header
// lists only the frames its mappings reach: with gaps, only the frames are
// checked). The first problem ends the check, naming the object and frame.
#pragma once

#include <cstdint>
#include <string>

#include "common/io_context.h"
#include "common/status.h"
#include "image/header.h"
#include "storage/object_store.h"

namespace lazyblock::image {

struct DataFileCheck {
  std::string key;              // the object read
  uint64_t stored_bytes = 0;    // its size
  uint64_t size = 0;            // its uncompressed bytes read
  size_t frames = 0;            // frames decompressed and verified
  bool size_checked = false;    // against the header's size
  bool sha256_checked = false;  // against the header's SHA-256
};

// Checks the data file `name` of `info.build_id` in `store`, stored as
// `info.frame_table` says. `mapped_end` is the end of the furthest range
// that mappings take from it: a data file shorter than that is truncated
// even where no size is recorded. kCorruption naming the object (and the
// first bad frame) if it does not match; the store's error if unreadable.
Result<DataFileCheck> verify_data_file(ObjectStore& store, const std::string& name,
                                       const BuildInfo& info, uint64_t mapped_end,
                                       const IoContext& io);

}  // namespace lazyblock::image
