#include "image/device.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <vector>

#include <fmt/format.h>

#include "chunk/frame_chunker.h"
#include "common/task_group.h"
#include "common/units.h"

namespace lazyblock::image {
namespace {

// Zeros for slices of nil ranges: as large as the largest page a fault asks
// for (a 2 MiB huge page).
constexpr uint64_t kZeroSliceMax = 2 * kMiB;

std::span<const std::byte> zeros(uint64_t length) {
  static const std::vector<std::byte> kZeros(kZeroSliceMax);
  return std::span(kZeros).first(length);
}

}  // namespace

std::string data_key(const Uuid& build, const std::string& name) {
  return build.to_string() + "/" + name;
}

std::string header_key(const Uuid& build, const std::string& name) {
  return data_key(build, name) + ".header";
}

Result<std::vector<std::byte>> read_small_object(ObjectStore& store, const std::string& key,
                                                 uint64_t max_bytes,
                                                 std::chrono::nanoseconds timeout) {
  const IoContext io{Clock::now() + timeout, {}};
  Result<uint64_t> size = store.stat(key, io);
  if (!size) return size.status();
  if (*size > max_bytes) {
    return Status::corruption(fmt::format("{} is {} bytes, more than the {} it may be", key, *size,
                                          format_size(max_bytes)));
  }
  std::vector<std::byte> bytes(*size);
  Result<std::unique_ptr<RangeReader>> reader = store.open_range(key, 0, *size, io);
  if (!reader) return reader.status();
  uint64_t done = 0;
  while (done < *size) {
    Result<size_t> got = (*reader)->read(std::span(bytes).subspan(done));
    if (!got) return got.status().with_context(key);
    if (*got == 0) break;
    done += *got;
  }
  if (done != *size || (*reader)->range_length() != *size) {
    return Status::corruption(fmt::format("{}: read {} of its {} bytes", key, done, *size));
  }
  return bytes;
}

Result<Header> load_header(ObjectStore& store, const Uuid& build, const std::string& name,
                           std::chrono::nanoseconds timeout) {
  const std::string key = header_key(build, name);
  Result<std::vector<std::byte>> bytes = read_small_object(store, key, kMaxHeaderBytes, timeout);
  if (!bytes) return bytes.status().with_context("header");
  Result<Header> header = Header::parse(*bytes);
  if (!header) return header.status().with_context("header " + key);
  if (header->build_id != build) {
    return Status::corruption(
        fmt::format("header {} belongs to build {}", key, header->build_id.to_string()));
  }
  return header;
}

DataFiles::DataFiles(std::shared_ptr<ObjectStore> store, ChunkerOptions options)
    : store_(std::move(store)), options_(std::move(options)) {}

namespace {

// The frames of `info`'s data file as the chunk layer takes them.
FrameGeometry geometry_of(const BuildInfo& info) {
  FrameGeometry geometry;
  geometry.codec = info.frame_table.codec == Codec::kLz4 ? FrameCodec::kLz4 : FrameCodec::kZstd;
  for (const Frame& frame : info.frame_table.frames) {
    geometry.frames.push_back({frame.start_u, frame.size_u, frame.start_c, frame.size_c});
  }
  return geometry;
}

}  // namespace

Result<Chunker*> DataFiles::chunker(const Uuid& build, const std::string& name,
                                    const Header& referrer) {
  {
    MutexLock lock(mu_);
    if (auto it = chunkers_.find({build, name}); it != chunkers_.end()) return it->second.get();
  }
  // How the data file is stored: the referring header's entry, else the
  // build's own header's entry for itself.
  const BuildInfo* info = referrer.find_build(build);
  std::optional<Header> own;
  if (info == nullptr && !referrer.codec_of(build)) {
    Result<Header> loaded = load_header(*store_, build, name, options_.fetch_timeout);
    if (!loaded)
      return loaded.status().with_context("how build " + build.to_string() + " is stored");
    own = std::move(loaded).value();
    info = own->find_build(build);
  }
  Result<std::unique_ptr<Chunker>> made =
      info != nullptr && info->frame_table.compressed()
          ? make_frame_chunker(
                store_,
                data_key(build, name) + std::string(data_file_suffix(info->frame_table.codec)),
                geometry_of(*info), options_)
          : make_chunker(store_, data_key(build, name), std::nullopt, options_);
  if (!made) return made.status();
  MutexLock lock(mu_);
  // Another caller may have made it meanwhile: the first one stays.
  auto [it, inserted] = chunkers_.try_emplace({build, name}, std::move(made).value());
  if (inserted && cancelled_) it->second->cancel();
  return it->second.get();
}

void DataFiles::cancel() {
  MutexLock lock(mu_);
  cancelled_ = true;
  for (auto& [file, chunker] : chunkers_) chunker->cancel();
}

std::map<Uuid, ChunkerStats> DataFiles::stats() const {
  MutexLock lock(mu_);
  std::map<Uuid, ChunkerStats> by_build;
  for (const auto& [file, chunker] : chunkers_) {
    const ChunkerStats stats = chunker->stats();
    ChunkerStats& sum = by_build[file.first];
    sum.requests += stats.requests;
    sum.bytes += stats.bytes;
    sum.waiting += stats.waiting;
    sum.streams += stats.streams;
  }
  return by_build;
}

Result<std::unique_ptr<Device>> Device::open(std::shared_ptr<DataFiles> files, const Uuid& build,
                                             std::string name) {
  Result<Header> header = load_header(files->store(), build, name, files->options().fetch_timeout);
  if (!header) return header.status();
  return std::make_unique<Device>(std::move(files), std::move(header).value(), std::move(name));
}

Device::Device(std::shared_ptr<DataFiles> files, Header header, std::string name)
    : Disk(header.size, header.block_size, /*writable=*/false),
      files_(std::move(files)),
      header_(std::move(header)),
      name_(std::move(name)) {
  // One source per build, in the order the mappings first name them.
  std::map<Uuid, size_t> source_of;
  for (const Mapping& mapping : header_.mappings) {
    if (mapping.build_id.is_nil() || source_of.contains(mapping.build_id)) continue;
    source_of.emplace(mapping.build_id, sources_.size());
    Source source{mapping.build_id, nullptr, Status::ok()};
    Result<Chunker*> chunker = files_->chunker(mapping.build_id, name_, header_);
    if (chunker) {
      source.chunker = *chunker;
    } else {
      source.error = chunker.status();
    }
    sources_.push_back(std::move(source));
  }
  extents_.reserve(header_.mappings.size());
  for (const Mapping& mapping : header_.mappings) {
    if (mapping.offset >= size()) break;  // the padding of a last partial block
    const Source* source =
        mapping.build_id.is_nil() ? nullptr : &sources_[source_of.at(mapping.build_id)];
    extents_.push_back(
        {mapping.offset, std::min(mapping.end(), size()), source, mapping.build_storage_offset});
  }
  if (extents_.empty()) return;  // an empty device: nothing is ever looked up
  bucket_shift_ = 12;
  while ((size() >> bucket_shift_) > extents_.size()) ++bucket_shift_;
  bucket_first_.resize(((size() - 1) >> bucket_shift_) + 2);
  size_t extent = 0;
  for (size_t bucket = 0; bucket < bucket_first_.size(); ++bucket) {
    const uint64_t first_byte = std::min<uint64_t>(uint64_t{bucket} << bucket_shift_, size() - 1);
    while (extents_[extent].end <= first_byte) ++extent;
    bucket_first_[bucket] = static_cast<uint32_t>(extent);
  }
}

Status Device::learn_sizes() {
  // One thread per data file: each size is a round trip to the store.
  std::vector<Status> learned(sources_.size());
  {
    TaskGroup tasks;
    for (size_t i = 0; i < sources_.size(); ++i) {
      tasks.spawn([this, i, &learned] {
        const Source& source = sources_[i];
        Result<Chunker*> chunker = chunker_of(source);
        if (!chunker) {
          learned[i] = chunker.status();
          return;
        }
        Result<uint64_t> size = (*chunker)->size();
        if (!size) {
          learned[i] = size.status().with_context("data file " + data_key(source.build, name_));
        }
      });
    }
  }  // every task has returned
  for (const Status& s : learned) {
    if (!s.is_ok()) return s;
  }
  return Status::ok();
}

const Device::Extent& Device::extent_at(uint64_t offset) const {
  // The last extent beginning at or before `offset`, among those of its
  // bucket (from the one holding the bucket's first byte to the one
  // holding the next bucket's, inclusive).
  const size_t bucket = offset >> bucket_shift_;
  const auto first = extents_.begin() + bucket_first_[bucket];
  const auto last = extents_.begin() + bucket_first_[bucket + 1] + 1;
  const auto after = std::upper_bound(first, last, offset,
                                      [](uint64_t at, const Extent& e) { return at < e.begin; });
  return *(after - 1);
}

Result<Chunker*> Device::chunker_of(const Source& source) const {
  if (source.chunker == nullptr) return source.error;
  return source.chunker;
}

Status Device::short_data_file(const Extent& extent, uint64_t stored_end,
                               uint64_t device_end) const {
  return Status::corruption(
      fmt::format("data file {} ends before {}, where the header maps device byte {}",
                  data_key(extent.source->build, name_), stored_end, device_end));
}

template <typename CopyStored>
bool Device::copy_pieces(std::span<std::byte> buffer, uint64_t offset,
                         CopyStored copy_stored) const {
  const uint64_t end = offset + buffer.size();
  for (uint64_t position = offset; position < end;) {
    const Extent& extent = extent_at(position);
    const uint64_t piece_end = std::min(end, extent.end);
    const std::span<std::byte> piece = buffer.subspan(position - offset, piece_end - position);
    if (extent.source == nullptr) {
      std::memset(piece.data(), 0, piece.size());
    } else if (!copy_stored(extent, piece, position)) {
      return false;
    }
    position = piece_end;
  }
  return true;
}

Status Device::do_read(std::span<std::byte> buffer, uint64_t offset) {
  Status failed = Status::ok();
  copy_pieces(
      buffer, offset, [&](const Extent& extent, std::span<std::byte> piece, uint64_t position) {
        Result<Chunker*> chunker = chunker_of(*extent.source);
        if (!chunker) {
          failed = chunker.status();
          return false;
        }
        const uint64_t stored_at = extent.storage_offset + (position - extent.begin);
        Result<size_t> got = (*chunker)->read_at(piece, stored_at);
        if (!got) {
          failed = got.status();
        } else if (*got != piece.size()) {
          failed = short_data_file(extent, stored_at + piece.size(), position + piece.size());
        }
        return failed.is_ok();
      });
  return failed;
}

Result<std::optional<std::span<const std::byte>>> Device::do_view(uint64_t offset,
                                                                  uint64_t length) {
  const uint64_t end = offset + length;
  const Extent& extent = extent_at(offset);
  if (end > extent.end) return std::optional<std::span<const std::byte>>();
  if (extent.source == nullptr) {
    if (length > kZeroSliceMax) return std::optional<std::span<const std::byte>>();
    return std::optional(zeros(length));
  }
  Result<Chunker*> chunker = chunker_of(*extent.source);
  if (!chunker) return chunker.status();
  const uint64_t stored_at = extent.storage_offset + (offset - extent.begin);
  Result<std::span<const std::byte>> bytes = (*chunker)->slice(stored_at, length);
  if (!bytes) return bytes.status();
  if (bytes->size() != length) return short_data_file(extent, stored_at + length, end);
  return std::optional(*bytes);
}

std::optional<std::span<const std::byte>> Device::do_cached_view(uint64_t offset, uint64_t length) {
  const Extent& extent = extent_at(offset);
  if (offset + length > extent.end) return std::nullopt;
  if (extent.source == nullptr) {
    if (length > kZeroSliceMax) return std::nullopt;
    return zeros(length);
  }
  if (extent.source->chunker == nullptr) return std::nullopt;
  std::optional<std::span<const std::byte>> bytes =
      extent.source->chunker->cached_slice(extent.storage_offset + (offset - extent.begin), length);
  // A data file shorter than the header says is view()'s error to report.
  if (bytes && bytes->size() != length) return std::nullopt;
  return bytes;
}

bool Device::do_read_cached(std::span<std::byte> buffer, uint64_t offset) {
  return copy_pieces(buffer, offset,
                     [](const Extent& extent, std::span<std::byte> piece, uint64_t position) {
                       return extent.source->chunker != nullptr &&
                              extent.source->chunker->read_cached(
                                  piece, extent.storage_offset + (position - extent.begin));
                     });
}

bool Device::do_is_zero(uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;
  for (uint64_t position = offset; position < end;) {
    const Extent& extent = extent_at(position);
    if (extent.source != nullptr) return false;
    position = extent.end;
  }
  return true;
}

void Device::do_prefetch(uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;
  for (uint64_t position = offset; position < end;) {
    const Extent& extent = extent_at(position);
    const uint64_t piece_end = std::min(end, extent.end);
    // A data file without a chunker fails the reads that need it.
    if (extent.source != nullptr && extent.source->chunker != nullptr) {
      extent.source->chunker->prefetch(extent.storage_offset + (position - extent.begin),
                                       piece_end - position);
    }
    position = piece_end;
  }
}

Status Device::do_extents(uint64_t offset, uint64_t length, std::vector<DiskExtent>& out) {
  const uint64_t end = offset + length;
  for (uint64_t position = offset; position < end;) {
    const Extent& extent = extent_at(position);
    const uint64_t piece_end = std::min(end, extent.end);
    out.push_back({position, piece_end - position,
                   extent.source == nullptr ? DiskExtent::Kind::kZero : DiskExtent::Kind::kData});
    position = piece_end;
  }
  return Status::ok();
}

Disk::Readahead Device::readahead() const {
  const ChunkerOptions& options = files_->options();
  // Ranges up to this far ahead of the writer are asked of their chunkers,
  // which start them parallel at a time each.
  return {options.chunk_size, 2 * static_cast<uint64_t>(options.parallel) * options.chunk_size};
}

}  // namespace lazyblock::image
