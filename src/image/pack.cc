#include "image/pack.h"
#include "common/file_io.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <set>
#include <vector>

#include <fmt/format.h>

#include "chunk/frame_codec.h"
#include "common/mapped_region.h"
#include "common/unique_fd.h"
#include "common/units.h"
#include "image/overlay.h"

namespace lazyblock::image {
namespace {

// Bytes read from the source (and compared with the parent) at a time.
constexpr uint64_t kBatch = 4 * kMiB;

bool all_zero(std::span<const std::byte> bytes) {
  // Compare against the first byte's being zero, then the rest with itself
  // shifted by one: memcmp does the work at memory speed.
  return bytes.empty() || (bytes[0] == std::byte{0} &&
                           std::memcmp(bytes.data(), bytes.data() + 1, bytes.size() - 1) == 0);
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
  Result<MappedRegion> map =
      MappedRegion::map(length, PROT_READ, MAP_SHARED, fd, 0, "the new data file");
  if (!map) return map.status();
  return store.put(key, std::span<const std::byte>(map->data(), length), io);
}

// Adds block `device_offset`'s bytes to the new build: nil if zeros, else
// appended to the new data file.
Status add_block(std::span<const std::byte> bytes, uint64_t device_offset, DataFileWriter& data,
                 const PackOptions& options, PackSummary& summary) {
  if (all_zero(bytes)) {
    add_run(summary.header.mappings, device_offset, bytes.size(), Uuid::nil(), 0);
    ++summary.zero;
    return Status::ok();
  }
  const uint64_t stored_at = data.size();
  LB_RETURN_IF_ERROR(data.append(bytes));
  add_run(summary.header.mappings, device_offset, bytes.size(), options.build, stored_at);
  ++summary.changed;
  return Status::ok();
}

// Maps block `device_offset` where `parent` maps it: piece by piece, as a
// version 4 or 5 parent may map a block of 2 MiB in 4 KiB pieces. Past the
// parent's mappings (its device's last page) the block reads as zeros.
void keep_parent_block(const Device& parent, uint64_t device_offset, uint64_t block,
                       PackSummary& summary) {
  const Header& from = parent.header();
  const uint64_t mapped_end = from.mappings.empty() ? 0 : from.mappings.back().end();
  for (uint64_t at = device_offset; at < device_offset + block;) {
    if (at >= mapped_end) {
      add_run(summary.header.mappings, at, device_offset + block - at, Uuid::nil(), 0);
      break;
    }
    const Mapping& source = from.mappings[from.mapping_at(at)];
    const uint64_t end = std::min(source.end(), device_offset + block);
    add_run(summary.header.mappings, at, end - at, source.build_id,
            source.build_id.is_nil() ? 0 : source.build_storage_offset + (at - source.offset));
    at = end;
  }
  ++summary.unchanged;
}

// Packs a raw image read from `source_fd`, compared block by block with
// `parent` (if any).
Status pack_source(Device* parent, int source_fd, DataFileWriter& data, const PackOptions& options,
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
        LB_RETURN_IF_ERROR(add_block(bytes, offset + at, data, options, summary));
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
Status pack_overlay(Device& parent, const std::filesystem::path& path, DataFileWriter& data,
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
        LB_RETURN_IF_ERROR(add_block(piece, offset + at, data, options, summary));
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

// The header version of the new build (see PackOptions::header_version).
Result<uint64_t> resolve_version(const PackOptions& options, const Header* parent) {
  const uint64_t inherited = parent != nullptr ? parent->version : 3;
  const uint64_t version = options.header_version.value_or(
      std::max<uint64_t>(inherited, options.codec != Codec::kNone ? 4 : 3));
  if (version < 3 || version > 5) {
    return Status::invalid_argument(
        fmt::format("header version {}: pack writes versions 3, 4 and 5", version));
  }
  if (version == 3 && options.codec != Codec::kNone) {
    return Status::invalid_argument(fmt::format(
        "a version 3 header cannot describe a build compressed with {}: use version 4 or 5",
        codec_name(options.codec)));
  }
  return version;
}

// What a version 4 or 5 header records of each build its mappings name (as
// E2B's upload does): the new build's own data file as written, and for each
// ancestor the parent's entry, else, where the parent's header has none, the
// ancestor's own header's entry for itself (an empty one, meaning plain,
// for a build stored plain). For a version 3 header, whose every build
// reads as plain, it only checks that none is compressed.
Status record_builds(DataFiles& files, const PackOptions& options, const Header* parent,
                     const WrittenDataFile& written, Header& header) {
  std::set<Uuid> named;
  for (const Mapping& m : header.mappings) {
    if (!m.build_id.is_nil() && m.build_id != header.build_id) named.insert(m.build_id);
  }
  std::vector<BuildInfo> builds;
  for (const Uuid& ancestor : named) {
    BuildInfo info{ancestor, 0, {}, {}};
    if (const BuildInfo* recorded = parent != nullptr ? parent->find_build(ancestor) : nullptr) {
      info = *recorded;
    } else if (parent == nullptr || !parent->codec_of(ancestor)) {
      Result<Header> own =
          load_header(files.store(), ancestor, options.name, files.options().fetch_timeout);
      if (!own)
        return own.status().with_context("how build " + ancestor.to_string() + " is stored");
      if (const BuildInfo* recorded = own->find_build(ancestor)) info = *recorded;
    }
    if (header.version == 3 && info.frame_table.compressed()) {
      return Status::invalid_argument(fmt::format(
          "a version 3 header cannot map into build {}, which is compressed with {}: use "
          "version 4 or 5",
          ancestor.to_string(), codec_name(info.frame_table.codec)));
    }
    builds.push_back(std::move(info));
  }
  if (header.version == 3) return Status::ok();
  builds.push_back({header.build_id, written.size, written.sha256, written.frame_table});
  std::sort(builds.begin(), builds.end(),
            [](const BuildInfo& a, const BuildInfo& b) { return a.build_id < b.build_id; });
  header.builds = std::move(builds);
  return Status::ok();
}

// Versions 4 and 5 map the device to its last 4 KiB page, not to the end of
// its last block: the mappings past that are cut.
void trim_to_pages(Header& header) {
  const uint64_t end = align_up(header.size, kPageSize);
  std::vector<Mapping>& mappings = header.mappings;
  while (!mappings.empty() && mappings.back().offset >= end) mappings.pop_back();
  if (!mappings.empty() && mappings.back().end() > end) {
    mappings.back().length = end - mappings.back().offset;
  }
}

}  // namespace

Result<PackSummary> pack(const std::shared_ptr<DataFiles>& files, int source_fd,
                         const PackOptions& options,
                         const std::function<void(uint64_t bytes_read)>& progress) {
  LB_RETURN_IF_ERROR(check_target(files->store(), options));
  PackSummary summary;
  Header& header = summary.header;
  header.build_id = options.build;
  header.base_build_id = options.build;
  std::unique_ptr<Device> parent;
  uint64_t block = options.block_size.value_or(4096);
  if (options.parent) {
    Result<Header> parent_header =
        load_header(files->store(), *options.parent, options.name, files->options().fetch_timeout);
    if (!parent_header) return parent_header.status().with_context("parent");
    if (!options.block_size) block = parent_header->block_size;
    if (parent_header->block_size != block) {
      return Status::invalid_argument(fmt::format("the parent {} has blocks of {} bytes, not {}",
                                                  options.parent->to_string(),
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
  Result<uint64_t> version = resolve_version(options, parent ? &parent->header() : nullptr);
  if (!version) return version.status();
  header.version = *version;
  if (options.codec != Codec::kNone && options.frame_size % block != 0) {
    return Status::invalid_argument(fmt::format(
        "frame size {} is not a multiple of the block size {}: a block must not straddle frames",
        options.frame_size, block));
  }
  PackOptions resolved = options;
  resolved.block_size = block;

  // The new data file, unnamed: gone if the pack fails.
  Result<UniqueFd> opened_fd = open_unnamed_file(
      options.temp_dir.empty() ? temp_directory() : options.temp_dir, "a temporary file");
  if (!opened_fd) return opened_fd.status();
  const UniqueFd data_fd = std::move(*opened_fd);
  DataFileFormat format;
  format.codec = options.codec;
  if (options.codec != Codec::kNone) {
    const FrameCodec codec = options.codec == Codec::kLz4 ? FrameCodec::kLz4 : FrameCodec::kZstd;
    format.level = options.level.value_or(default_level(codec));
  }
  format.frame_size = options.frame_size;
  format.threads = options.encoder_threads;
  format.digest = header.version >= 4;
  Result<std::unique_ptr<DataFileWriter>> data = DataFileWriter::create(data_fd.get(), format);
  if (!data) return data.status();

  if (options.overlay) {
    if (!parent) return Status::invalid_argument("pack --overlay needs --parent");
    LB_RETURN_IF_ERROR(
        pack_overlay(*parent, *options.overlay, **data, resolved, summary, progress));
  } else {
    LB_RETURN_IF_ERROR(pack_source(parent.get(), source_fd, **data, resolved, summary, progress));
  }
  summary.blocks = div_round_up(header.size, block);
  Result<WrittenDataFile> written = (*data)->finish();
  if (!written) return written.status();
  summary.data_bytes = written->size;
  summary.stored_bytes = written->stored_bytes;
  summary.frame_table = written->frame_table;
  if (header.version >= 4) trim_to_pages(header);
  LB_RETURN_IF_ERROR(
      record_builds(*files, options, parent ? &parent->header() : nullptr, *written, header));

  Result<std::vector<std::byte>> header_bytes = header.serialize();
  if (!header_bytes) return header_bytes.status();
  summary.header_bytes = header_bytes->size();
  summary.data_key = data_key(options.build, options.name) +
                     std::string(data_file_suffix(written->frame_table.codec));
  // No deadline of a fetch's length for uploads of any size: the store's own
  // connect and stall timeouts guard them; a stop abandons them.
  const IoContext io{Clock::time_point::max(), options.stop};
  LB_RETURN_IF_ERROR(
      put_file(files->store(), summary.data_key, data_fd.get(), summary.stored_bytes, io));
  if (options.stop.stop_requested()) return Status::cancelled("pack: interrupted");
  // The header last: a build is visible only once its data is in place.
  LB_RETURN_IF_ERROR(
      files->store().put(header_key(options.build, options.name), *header_bytes, io));
  return summary;
}

}  // namespace lazyblock::image
