#include "image/pack.h"
#include "common/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "common/units.h"
#include "common/unique_fd.h"
#include "image/overlay.h"

namespace lazyblock::image {
namespace {

// Bytes read from the source (and compared with the parent) at a time.
constexpr uint64_t kBatch = 4 * kMiB;

bool all_zero(std::span<const std::byte> bytes) {
  // Compare against the first byte's being zero, then the rest with itself
  // shifted by one: memcmp does the work at memory speed.
  return bytes.empty() ||
         (bytes[0] == std::byte{0} && std::memcmp(bytes.data(), bytes.data() + 1, bytes.size() - 1) == 0);
}

// Reads until `buffer` is full or the source ends; returns the count read.
Result<size_t> read_full(int fd, std::span<std::byte> buffer) {
  size_t done = 0;
  while (done < buffer.size()) {
    const ssize_t got = ::read(fd, buffer.data() + done, buffer.size() - done);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return posix_error("read the image", errno);
    if (got == 0) break;
    done += static_cast<size_t>(got);
  }
  return done;
}

// An unnamed file for the new data file, gone when closed.
Result<int> open_temporary(const std::filesystem::path& dir_option) {
  const std::filesystem::path dir = dir_option.empty() ? temp_directory() : dir_option;
  int fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
  if (fd >= 0) return fd;
  // Not every file system has O_TMPFILE: a named file, unlinked at once.
  std::string name = (dir / "lazyblock-pack-XXXXXX").string();
  fd = ::mkostemp(name.data(), O_CLOEXEC);
  if (fd < 0) return posix_error("create a temporary file in " + dir.string(), errno);
  ::unlink(name.c_str());
  return fd;
}

// Appends a block-aligned run to `mappings`, joining it to the last one when
// they are one range in one file (or both zeros).
void add_run(std::vector<Mapping>& mappings, uint64_t offset, uint64_t length, const Uuid& build,
             uint64_t stored_at) {
  if (!mappings.empty()) {
    Mapping& last = mappings.back();
    if (last.end() == offset && last.build_id == build &&
        (build.is_nil() || last.build_storage_offset + last.length == stored_at)) {
      last.length += length;
      return;
    }
  }
  mappings.push_back({offset, length, build, build.is_nil() ? 0 : stored_at});
}

// Stores the `length` bytes of `fd` as `key`.
Status put_file(ObjectStore& store, const std::string& key, int fd, uint64_t length,
                const IoContext& io) {
  if (length == 0) return store.put(key, {}, io);
  void* map = ::mmap(nullptr, length, PROT_READ, MAP_SHARED, fd, 0);
  if (map == MAP_FAILED) return posix_error("map the new data file", errno);
  const Status status = store.put(key, std::span(static_cast<const std::byte*>(map), length), io);
  ::munmap(map, length);
  return status;
}

// Adds block `device_offset`'s bytes to the new build: nil if zeros, else
// appended to the new data file.
Status add_block(std::span<const std::byte> bytes, uint64_t device_offset, int data_fd,
                 const PackOptions& options, PackSummary& summary) {
  if (all_zero(bytes)) {
    add_run(summary.header.mappings, device_offset, bytes.size(), Uuid::nil(), 0);
    ++summary.zero;
    return Status::ok();
  }
  LB_RETURN_IF_ERROR(pwrite_all(data_fd, bytes, summary.data_bytes, "the new data file"));
  add_run(summary.header.mappings, device_offset, bytes.size(), options.build, summary.data_bytes);
  summary.data_bytes += bytes.size();
  ++summary.changed;
  return Status::ok();
}

// Maps block `device_offset` where `parent` maps it.
void keep_parent_block(const Device& parent, uint64_t device_offset, uint64_t block,
                       PackSummary& summary) {
  const Mapping& source = parent.header().mappings[parent.header().mapping_at(device_offset)];
  add_run(summary.header.mappings, device_offset, block, source.build_id,
          source.build_storage_offset + (device_offset - source.offset));
  ++summary.unchanged;
}

// Packs a raw image read from `source_fd`, compared block by block with
// `parent` (if any).
Status pack_source(Device* parent, int source_fd, int data_fd, const PackOptions& options,
                   PackSummary& summary, const std::function<void(uint64_t)>& progress) {
  const uint64_t block = *options.block_size;
  std::vector<std::byte> batch(kBatch);
  std::vector<std::byte> before(kBatch);  // the parent's bytes at the same offsets
  uint64_t offset = 0;
  for (;;) {
    if (options.stop.stop_requested()) return Status::cancelled("pack: interrupted");
    Result<size_t> got = read_full(source_fd, batch);
    if (!got) return got.status();
    if (*got == 0) break;
    // The last block of an image whose size is not a block multiple is
    // padded with zeros: the data file holds whole blocks.
    const uint64_t padded = align_up(*got, block);
    std::memset(batch.data() + *got, 0, padded - *got);
    uint64_t parent_bytes = 0;
    if (parent != nullptr) {
      Result<size_t> read = parent->read(std::span(before).first(padded), offset);
      if (!read) return read.status().with_context("read the parent");
      parent_bytes = *read;
      std::memset(before.data() + parent_bytes, 0, padded - parent_bytes);
    }
    for (uint64_t at = 0; at < padded; at += block) {
      const std::span<const std::byte> bytes = std::span(batch).subspan(at, block);
      if (!all_zero(bytes) && at < parent_bytes &&
          std::memcmp(bytes.data(), before.data() + at, block) == 0) {
        keep_parent_block(*parent, offset + at, block, summary);
      } else {
        LB_RETURN_IF_ERROR(add_block(bytes, offset + at, data_fd, options, summary));
      }
    }
    offset += *got;
    if (progress) progress(offset);
    if (*got < kBatch) break;
  }
  summary.header.size = offset;
  return Status::ok();
}

// Packs the parent's disk as a kept overlay changed it: only the overlay's
// blocks are read, and each is stored only if its bytes differ from the
// parent's (a block written back with the bytes it had keeps the parent's
// mapping, as pack of a raw image does).
Status pack_overlay(Device& parent, const std::filesystem::path& path, int data_fd,
                    const PackOptions& options, PackSummary& summary,
                    const std::function<void(uint64_t)>& progress) {
  const uint64_t block = parent.header().block_size;
  const OverlayIdentity identity{parent.header().build_id, options.name, parent.size(), block};
  Result<Overlay::Kept> kept = Overlay::open_kept(path, identity);
  if (!kept) return kept.status();
  const uint64_t blocks = kept->present.size();
  const uint64_t batch_blocks = kBatch / block;
  std::vector<std::byte> bytes(kBatch);
  std::vector<std::byte> before(kBatch);
  for (uint64_t index = 0; index < blocks;) {
    if (options.stop.stop_requested()) return Status::cancelled("pack: interrupted");
    if (!kept->present[index]) {
      keep_parent_block(parent, index * block, block, summary);
      ++index;
      continue;
    }
    // A run of the overlay's blocks, read and compared a batch at a time.
    uint64_t run_end = index;
    while (run_end < blocks && run_end - index < batch_blocks && kept->present[run_end]) ++run_end;
    const uint64_t offset = index * block;
    const uint64_t length = (run_end - index) * block;
    Result<size_t> got = pread_up_to(kept->fd.get(), std::span(bytes).first(length), offset,
                                     "overlay " + path.string());
    if (!got) return got.status();
    std::memset(bytes.data() + *got, 0, length - *got);
    Result<size_t> read = parent.read(std::span(before).first(length), offset);
    if (!read) return read.status().with_context("read the parent");
    std::memset(before.data() + *read, 0, length - *read);
    for (uint64_t at = 0; at < length; at += block) {
      const std::span<const std::byte> piece = std::span(bytes).subspan(at, block);
      if (!all_zero(piece) && std::memcmp(piece.data(), before.data() + at, block) == 0) {
        keep_parent_block(parent, offset + at, block, summary);
      } else {
        LB_RETURN_IF_ERROR(add_block(piece, offset + at, data_fd, options, summary));
      }
    }
    index = run_end;
    if (progress) progress(index * block);
  }
  summary.header.size = parent.size();
  if (progress) progress(parent.size());
  return Status::ok();
}

// Refuses what would replace a build or cannot be stored, before any work.
Status check_target(ObjectStore& store, const PackOptions& options) {
  if (store.read_only()) {
    return Status::invalid_argument(fmt::format(
        "{} is read-only: pack writes to file://, s3:// or gs:// stores", store.describe()));
  }
  if (options.parent && *options.parent == options.build) {
    return Status::invalid_argument(
        fmt::format("--parent {} is the build itself: a build's parent is an earlier build",
                    options.build.to_string()));
  }
  if (options.force) return Status::ok();
  const std::string key = header_key(options.build, options.name);
  const IoContext io{Clock::now() + std::chrono::seconds(60), options.stop};
  Result<uint64_t> existing = store.stat(key, io);
  if (existing) {
    return Status::already_exists(fmt::format(
        "build {} already has {} ({} exists): builds are immutable; pack a new build id, or "
        "give --force to replace it",
        options.build.to_string(), options.name, key));
  }
  if (existing.status().code() != StatusCode::kNotFound) {
    return existing.status().with_context("look for an existing " + key);
  }
  return Status::ok();
}

}  // namespace

Result<PackSummary> pack(const std::shared_ptr<DataFiles>& files, int source_fd, const PackOptions& options,
                         const std::function<void(uint64_t bytes_read)>& progress) {
  LB_RETURN_IF_ERROR(check_target(files->store(), options));
  PackSummary summary;
  Header& header = summary.header;
  header.build_id = options.build;
  header.base_build_id = options.build;
  std::unique_ptr<Device> parent;
  uint64_t block = options.block_size.value_or(4096);
  if (options.parent) {
    Result<Header> parent_header = load_header(files->store(), *options.parent, options.name,
                                               files->options().fetch_timeout);
    if (!parent_header) return parent_header.status().with_context("parent");
    if (!options.block_size) block = parent_header->block_size;
    LB_RETURN_IF_ERROR(check_plain_whole_blocks(*parent_header));
    if (parent_header->block_size != block) {
      return Status::invalid_argument(fmt::format(
          "the parent {} has blocks of {} bytes, not {}", options.parent->to_string(),
          parent_header->block_size, block));
    }
    header.generation = parent_header->generation + 1;
    header.base_build_id = parent_header->base_build_id;
    summary.parent_size = parent_header->size;
    parent = std::make_unique<Device>(files, std::move(parent_header).value(), options.name);
  }
  if (block == 0 || (block & (block - 1)) != 0 || kBatch % block != 0) {
    return Status::invalid_argument(fmt::format(
        "block size {} must be a power of two no larger than {}", block, format_size(kBatch)));
  }
  header.block_size = block;
  PackOptions resolved = options;
  resolved.block_size = block;

  Result<int> opened_fd = open_temporary(options.temp_dir);
  if (!opened_fd) return opened_fd.status();
  const UniqueFd data_fd(*opened_fd);

  if (options.overlay) {
    if (!parent) return Status::invalid_argument("pack --overlay needs --parent");
    LB_RETURN_IF_ERROR(
        pack_overlay(*parent, *options.overlay, data_fd.get(), resolved, summary, progress));
  } else {
    LB_RETURN_IF_ERROR(
        pack_source(parent.get(), source_fd, data_fd.get(), resolved, summary, progress));
  }
  summary.blocks = div_round_up(header.size, block);

  Result<std::vector<std::byte>> header_bytes = header.serialize();
  if (!header_bytes) return header_bytes.status();
  summary.header_bytes = header_bytes->size();
  // No deadline of a fetch's length for uploads of any size: the store's own
  // connect and stall timeouts guard them; a stop abandons them.
  const IoContext io{Clock::time_point::max(), options.stop};
  LB_RETURN_IF_ERROR(put_file(files->store(), data_key(options.build, options.name), data_fd.get(),
                              summary.data_bytes, io));
  if (options.stop.stop_requested()) return Status::cancelled("pack: interrupted");
  // The header last: a build is visible only once its data is in place.
  LB_RETURN_IF_ERROR(files->store().put(header_key(options.build, options.name), *header_bytes, io));
  return summary;
}

}  // namespace lazyblock::image
