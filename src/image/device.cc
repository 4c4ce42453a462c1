#include "image/device.h"

#include <algorithm>
#include <cstring>
#include <future>
#include <set>
#include <vector>

#include <fmt/format.h>

#include "chunk/frame_chunker.h"
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
    return Status::corruption(fmt::format("{} is {} bytes, more than the {} it may be", key,
                                          *size, format_size(max_bytes)));
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
    return Status::corruption(fmt::format("header {} belongs to build {}", key,
                                          header->build_id.to_string()));
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
    std::lock_guard lock(mu_);
    if (auto it = chunkers_.find({build, name}); it != chunkers_.end()) return it->second.get();
  }
  // How the data file is stored: the referring header's entry, else the
  // build's own header's entry for itself.
  const BuildInfo* info = referrer.find_build(build);
  std::optional<Header> own;
  if (info == nullptr && !referrer.codec_of(build)) {
    Result<Header> loaded = load_header(*store_, build, name, options_.fetch_timeout);
    if (!loaded) return loaded.status().with_context("how build " + build.to_string() + " is stored");
    own = std::move(loaded).value();
    info = own->find_build(build);
  }
  Result<std::unique_ptr<Chunker>> made =
      info != nullptr && info->frame_table.compressed()
          ? make_frame_chunker(store_,
                               data_key(build, name) +
                                   std::string(data_file_suffix(info->frame_table.codec)),
                               geometry_of(*info), options_)
          : make_chunker(store_, data_key(build, name), std::nullopt, options_);
  if (!made) return made.status();
  std::lock_guard lock(mu_);
  // Another caller may have made it meanwhile: the first one stays.
  auto [it, inserted] = chunkers_.try_emplace({build, name}, std::move(made).value());
  if (inserted && cancelled_) it->second->cancel();
  return it->second.get();
}

void DataFiles::cancel() {
  std::lock_guard lock(mu_);
  cancelled_ = true;
  for (auto& [file, chunker] : chunkers_) chunker->cancel();
}

std::map<Uuid, ChunkerStats> DataFiles::stats() const {
  std::lock_guard lock(mu_);
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
  Result<Header> header =
      load_header(files->store(), build, name, files->options().fetch_timeout);
  if (!header) return header.status();
  return std::make_unique<Device>(std::move(files), std::move(header).value(), std::move(name));
}

Device::Device(std::shared_ptr<DataFiles> files, Header header, std::string name)
    : files_(std::move(files)), header_(std::move(header)), name_(std::move(name)) {}

Status Device::learn_sizes() {
  std::set<Uuid> builds;
  for (const Mapping& mapping : header_.mappings) {
    if (!mapping.build_id.is_nil()) builds.insert(mapping.build_id);
  }
  std::vector<std::future<Status>> learned;
  for (const Uuid& build : builds) {
    learned.push_back(std::async(std::launch::async, [this, build]() -> Status {
      Result<Chunker*> chunker = files_->chunker(build, name_, header_);
      if (!chunker) return chunker.status();
      Result<uint64_t> size = (*chunker)->size();
      if (!size) return size.status().with_context("data file " + data_key(build, name_));
      return Status::ok();
    }));
  }
  Status first_error;
  for (std::future<Status>& status : learned) {
    Status s = status.get();
    if (!s.is_ok() && first_error.is_ok()) first_error = s;
  }
  return first_error;
}

Result<Chunker*> Device::chunker_for(const Mapping& mapping) {
  return files_->chunker(mapping.build_id, name_, header_);
}

Result<size_t> Device::read_at(std::span<std::byte> buffer, uint64_t offset) {
  if (offset >= size() || buffer.empty()) return size_t{0};
  const uint64_t end = offset + std::min<uint64_t>(buffer.size(), size() - offset);
  for (uint64_t position = offset; position < end;) {
    const Mapping& mapping = header_.mappings[header_.mapping_at(position)];
    const uint64_t piece_end = std::min(end, mapping.end());
    const std::span<std::byte> piece = buffer.subspan(position - offset, piece_end - position);
    if (mapping.build_id.is_nil()) {
      std::memset(piece.data(), 0, piece.size());
    } else {
      Result<Chunker*> chunker = chunker_for(mapping);
      if (!chunker) return chunker.status();
      const uint64_t stored_at = mapping.build_storage_offset + (position - mapping.offset);
      Result<size_t> got = (*chunker)->read_at(piece, stored_at);
      if (!got) return got.status();
      if (*got != piece.size()) {
        return Status::corruption(fmt::format(
            "data file {} ends before {}, where the header maps device byte {}",
            data_key(mapping.build_id, name_), stored_at + piece.size(), piece_end));
      }
    }
    position = piece_end;
  }
  return end - offset;
}

Result<std::span<const std::byte>> Device::slice(uint64_t offset, uint64_t length) {
  if (offset >= size() || length == 0) return std::span<const std::byte>();
  const uint64_t end = offset + std::min(length, size() - offset);
  const Mapping& mapping = header_.mappings[header_.mapping_at(offset)];
  if (end > mapping.end()) {
    return Status::invalid_argument(fmt::format(
        "device {} [{}, {}) crosses mappings: read it with read_at", name_, offset, end));
  }
  if (mapping.build_id.is_nil()) {
    if (end - offset > kZeroSliceMax) {
      return Status::invalid_argument(fmt::format(
          "device {} [{}, {}): a zero slice is at most {}", name_, offset, end,
          format_size(kZeroSliceMax)));
    }
    return zeros(end - offset);
  }
  Result<Chunker*> chunker = chunker_for(mapping);
  if (!chunker) return chunker.status();
  const uint64_t stored_at = mapping.build_storage_offset + (offset - mapping.offset);
  Result<std::span<const std::byte>> bytes = (*chunker)->slice(stored_at, end - offset);
  if (!bytes) return bytes.status();
  if (bytes->size() != end - offset) {
    return Status::corruption(fmt::format(
        "data file {} ends before {}, where the header maps device byte {}",
        data_key(mapping.build_id, name_), stored_at + (end - offset), end));
  }
  return bytes;
}

bool Device::is_zero(uint64_t offset, uint64_t length) const {
  if (offset >= size()) return true;
  const uint64_t end = offset + std::min(length, size() - offset);
  for (uint64_t position = offset; position < end;) {
    const Mapping& mapping = header_.mappings[header_.mapping_at(position)];
    if (!mapping.build_id.is_nil()) return false;
    position = mapping.end();
  }
  return true;
}

std::optional<std::span<const std::byte>> Device::cached_slice(uint64_t offset, uint64_t length) {
  if (offset >= size() || length == 0) return std::span<const std::byte>();
  const uint64_t end = offset + std::min(length, size() - offset);
  const Mapping& mapping = header_.mappings[header_.mapping_at(offset)];
  if (end > mapping.end()) return std::nullopt;
  if (mapping.build_id.is_nil()) {
    if (end - offset > kZeroSliceMax) return std::nullopt;
    return zeros(end - offset);
  }
  Result<Chunker*> chunker = chunker_for(mapping);
  if (!chunker) return std::nullopt;
  const uint64_t stored_at = mapping.build_storage_offset + (offset - mapping.offset);
  std::optional<std::span<const std::byte>> bytes = (*chunker)->cached_slice(stored_at, end - offset);
  // A data file shorter than the header says is slice()'s error to report.
  if (bytes && bytes->size() != end - offset) return std::nullopt;
  return bytes;
}

void Device::prefetch(uint64_t offset, uint64_t length) {
  if (offset >= size()) return;
  const uint64_t end = offset + std::min(length, size() - offset);
  for (uint64_t position = offset; position < end;) {
    const Mapping& mapping = header_.mappings[header_.mapping_at(position)];
    const uint64_t piece_end = std::min(end, mapping.end());
    if (!mapping.build_id.is_nil()) {
      // A data file that cannot be opened fails the reads that need it.
      if (Result<Chunker*> chunker = chunker_for(mapping)) {
        (*chunker)->prefetch(mapping.build_storage_offset + (position - mapping.offset),
                             piece_end - position);
      }
    }
    position = piece_end;
  }
}

Status Device::write_to(ByteSink& sink) {
  const ChunkerOptions& options = files_->options();
  const uint64_t piece_max = options.chunk_size;
  // Ranges up to this far ahead of the writer are asked of their chunkers,
  // which start them readahead_streams at a time each.
  const uint64_t window = 2 * static_cast<uint64_t>(options.readahead_streams) * options.chunk_size;
  uint64_t asked_until = 0;
  const auto ask_ahead = [&](uint64_t until) -> Status {
    while (asked_until < until) {
      const Mapping& mapping = header_.mappings[header_.mapping_at(asked_until)];
      const uint64_t piece_end = std::min(until, mapping.end());
      if (!mapping.build_id.is_nil()) {
        Result<Chunker*> chunker = chunker_for(mapping);
        if (!chunker) return chunker.status();
        (*chunker)->prefetch(mapping.build_storage_offset + (asked_until - mapping.offset),
                             piece_end - asked_until);
      }
      asked_until = piece_end;
    }
    return Status::ok();
  };
  for (uint64_t position = 0; position < size();) {
    LB_RETURN_IF_ERROR(ask_ahead(std::min(size(), position + window)));
    const Mapping& mapping = header_.mappings[header_.mapping_at(position)];
    const uint64_t piece_end = std::min({size(), mapping.end(), position + piece_max});
    if (mapping.build_id.is_nil()) {
      LB_RETURN_IF_ERROR(sink.write_zeros(piece_end - position));
    } else {
      Result<std::span<const std::byte>> bytes = slice(position, piece_end - position);
      if (!bytes) return bytes.status();
      LB_RETURN_IF_ERROR(sink.write(*bytes));
    }
    position = piece_end;
  }
  return Status::ok();
}

}  // namespace lazyblock::image
