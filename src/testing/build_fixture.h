// pack_build: a build packed into a file store, for the set-up of the tests
// and benchmarks that serve or read a build and do not test `pack` itself.
// It packs in process, as `lazyblock pack` would with its default flags (the
// same header and data file), without a child process per fixture.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <utility>

#include "common/mapped_region.h"
#include "common/status.h"
#include "image/header.h"
#include "image/pack.h"
#include "storage/file_store.h"

namespace lazyblock::testing {

// Fills `out` with the raw image's bytes [offset, offset + out.size()). It is
// called for the image's consecutive pieces of 4 MiB (the last one shorter),
// so a piece never crosses a 4 MiB boundary.
using ImageBytes = std::function<void(uint64_t offset, std::span<std::byte> out)>;

struct BuildSpec {
  BuildSpec(std::filesystem::path store_dir, std::string build_id, std::string device)
      : store(std::move(store_dir)), build(std::move(build_id)), name(std::move(device)) {}

  std::filesystem::path store;  // the file store's directory, created if missing
  std::string build;            // the build's UUID; empty: a random one
  std::string name;             // the device: "rootfs.ext4", "memfile", ...
  // Where the raw image is written and kept (for clients' reads to be
  // compared with it). Empty: an unnamed file beside the store, gone after.
  std::filesystem::path raw;
  // Keep the raw image mapped (read-only, populated) in PackedBuild::raw.
  bool map_raw = false;
  // How the data file is stored (image::PackOptions): kNone for BUILD/NAME,
  // else BUILD/NAME.zstd or .lz4 in frames of frame_size (a test's small
  // image wants frames smaller than pack's 2 MiB, to have several).
  image::Codec codec = image::Codec::kNone;
  uint64_t frame_size = image::PackOptions{}.frame_size;
};

struct PackedBuild {
  std::shared_ptr<FileStore> store;
  std::string store_url;  // "file://" and the store's directory
  image::Uuid build;
  std::string data_key;  // the data file's key in the store ("BUILD/NAME", or with .zstd, .lz4)
  MappedRegion raw;      // the raw image, if BuildSpec::map_raw
};

// Packs the `size` bytes that `bytes` makes as device `spec.name` of
// `spec.build` into the file store `spec.store`.
Result<PackedBuild> pack_build(const BuildSpec& spec, uint64_t size, const ImageBytes& bytes);
// The same, for an image already in memory.
Result<PackedBuild> pack_build(const BuildSpec& spec, std::span<const std::byte> bytes);

}  // namespace lazyblock::testing
