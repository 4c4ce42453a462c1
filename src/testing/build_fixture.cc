#include "testing/build_fixture.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "chunk/chunker.h"
#include "common/file_io.h"
#include "common/unique_fd.h"
#include "image/device.h"

namespace lazyblock::testing {
namespace {

// The image is made and written in pieces this large, so a generated image
// of any size costs only this much memory.
constexpr uint64_t kPiece = 4 * 1024 * 1024;

Result<UniqueFd> open_raw(const BuildSpec& spec, const std::filesystem::path& beside) {
  if (spec.raw.empty()) return open_unnamed_file(beside, "raw image");
  UniqueFd fd(::open(spec.raw.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) return posix_error("open " + spec.raw.string(), errno);
  return fd;
}

}  // namespace

Result<PackedBuild> pack_build(const BuildSpec& spec, uint64_t size, const ImageBytes& bytes) {
  PackedBuild packed;
  if (spec.build.empty()) {
    packed.build = image::Uuid::random();
  } else {
    Result<image::Uuid> build = image::Uuid::parse(spec.build);
    if (!build) return build.status();
    packed.build = *build;
  }
  std::error_code error;
  std::filesystem::create_directories(spec.store, error);
  if (error) return posix_error("create " + spec.store.string(), error.value());
  Result<std::shared_ptr<FileStore>> store = FileStore::open(spec.store);
  if (!store) return store.status();
  packed.store = *store;
  packed.store_url = "file://" + spec.store.string();

  const std::filesystem::path beside = spec.store.parent_path();
  Result<UniqueFd> raw = open_raw(spec, beside);
  if (!raw) return raw.status();
  const std::string what = spec.raw.empty() ? "raw image" : spec.raw.string();
  std::vector<std::byte> piece(std::min(kPiece, size));
  for (uint64_t offset = 0; offset < size; offset += kPiece) {
    const std::span<std::byte> out = std::span(piece).first(std::min(kPiece, size - offset));
    bytes(offset, out);
    LB_RETURN_IF_ERROR(pwrite_all(raw->get(), out, offset, what));
  }
  // pack reads the image from the descriptor's offset to its end.
  if (::lseek(raw->get(), 0, SEEK_SET) != 0) return posix_error("seek " + what, errno);

  image::PackOptions options;
  options.build = packed.build;
  options.name = spec.name;
  options.temp_dir = beside;
  options.codec = spec.codec;
  options.frame_size = spec.frame_size;
  ChunkerOptions chunker;
  chunker.cache_dir = beside;
  Result<image::PackSummary> summary = image::pack(
      std::make_shared<image::DataFiles>(packed.store, chunker), raw->get(), options, nullptr);
  if (!summary) return summary.status().with_context("pack " + spec.name);
  packed.data_key = summary->data_key;
  if (spec.map_raw && size > 0) {
    Result<MappedRegion> map =
        MappedRegion::map(size, PROT_READ, MAP_SHARED | MAP_POPULATE, raw->get(), 0, what);
    if (!map) return map.status();
    packed.raw = std::move(*map);
  }
  return packed;
}

Result<PackedBuild> pack_build(const BuildSpec& spec, std::span<const std::byte> bytes) {
  return pack_build(spec, bytes.size(), [bytes](uint64_t offset, std::span<std::byte> out) {
    std::memcpy(out.data(), bytes.data() + offset, out.size());
  });
}

}  // namespace lazyblock::testing
