#include "image/overlay.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "common/file_io.h"
#include "common/units.h"

namespace lazyblock::image {
namespace {

// Overlay bytes; past the file's end (a disk not a block multiple), zeros.
Status pread_full(int fd, std::span<std::byte> buffer, uint64_t offset) {
  Result<size_t> got = pread_up_to(fd, buffer, offset, "the overlay");
  if (!got) return got.status();
  std::memset(buffer.data() + *got, 0, buffer.size() - *got);
  return Status::ok();
}

OverlayIdentity identity_of(const Device& device) {
  return {device.header().build_id, device.name(), device.size(), device.header().block_size};
}

// The data file must hold every block of the device.
Status check_data_file(int fd, const std::filesystem::path& path, uint64_t needed) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return posix_error("stat overlay " + path.string(), errno);
  if (!S_ISREG(st.st_mode)) {
    return Status::invalid_argument(fmt::format("overlay {} is not a regular file", path.string()));
  }
  if (static_cast<uint64_t>(st.st_size) < needed) {
    return Status::corruption(fmt::format(
        "overlay {} holds {} bytes, but its map needs {}: the data file was truncated or "
        "replaced",
        path.string(), st.st_size, needed));
  }
  return Status::ok();
}

}  // namespace

// Holds the stripes of a block range, each once, in stripe order (the one
// order every writer takes them in, so no two writers deadlock).
class Overlay::BlockLocks {
 public:
  BlockLocks(Overlay& overlay, uint64_t first, uint64_t last) {
    const uint64_t count = overlay.stripes_.size();
    std::array<bool, 64> wanted{};
    if (last - first + 1 >= count) {
      wanted.fill(true);
    } else {
      for (uint64_t block = first; block <= last; ++block) wanted[block % count] = true;
    }
    for (uint64_t i = 0; i < count; ++i) {
      if (wanted[i]) held_.emplace_back(overlay.stripes_[i]);
    }
  }

 private:
  std::vector<std::unique_lock<std::mutex>> held_;
};

Result<std::unique_ptr<Overlay>> Overlay::open(Device& device,
                                               std::optional<std::filesystem::path> path,
                                               const std::filesystem::path& temp_dir) {
  const uint64_t size = device.size();
  const uint64_t block = device.header().block_size;
  const uint64_t data_size = align_up(size, block);
  const OverlayIdentity identity = identity_of(device);
  if (!path) {
    const std::filesystem::path dir = temp_dir.empty() ? temp_directory() : temp_dir;
    Result<UniqueFd> fd = open_unnamed_file(dir, "an overlay");
    if (!fd) return fd.status();
    if (::ftruncate(fd->get(), static_cast<off_t>(data_size)) != 0) {
      return posix_error("size the overlay", errno);
    }
    return std::unique_ptr<Overlay>(new Overlay(device, std::move(*fd), nullptr));
  }

  std::unique_ptr<OverlayMap> map;
  UniqueFd fd;
  std::error_code ignored;  // a path that cannot be looked at is opened below, and refused there
  const bool data_exists = std::filesystem::exists(std::filesystem::symlink_status(*path, ignored));
  const bool map_exists = std::filesystem::exists(
      std::filesystem::symlink_status(OverlayMap::path_for(*path), ignored));
  if (!data_exists && !map_exists) {
    // A new overlay: the data file first, then the map that vouches for it.
    fd.reset(::open(path->c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
    if (!fd) return posix_error("create overlay " + path->string(), errno);
    if (::ftruncate(fd.get(), static_cast<off_t>(data_size)) != 0 || ::fsync(fd.get()) != 0) {
      const Status failed = posix_error("size overlay " + path->string(), errno);
      ::unlink(path->c_str());
      return failed;
    }
    Result<std::unique_ptr<OverlayMap>> created = OverlayMap::create(*path, identity, data_size);
    if (!created) {
      ::unlink(path->c_str());
      return created.status();
    }
    map = std::move(created).value();
  } else {
    Result<std::unique_ptr<OverlayMap>> opened =
        OverlayMap::open(*path, identity, OverlayMap::Access::kWrite);
    if (!opened) return opened.status();
    map = std::move(opened).value();
    fd.reset(::open(path->c_str(), O_RDWR | O_CLOEXEC));
    if (!fd) {
      if (errno == ENOENT) {
        return Status::not_found(fmt::format(
            "overlay {} of {}: its data file is missing (its map {} is there): the writes it "
            "held are gone; remove the map to start afresh",
            path->string(), identity.to_string(), OverlayMap::path_for(*path).string()));
      }
      return posix_error("open overlay " + path->string(), errno);
    }
    LB_RETURN_IF_ERROR(check_data_file(fd.get(), *path, map->data_file_size()));
  }
  std::unique_ptr<Overlay> overlay(new Overlay(device, std::move(fd), std::move(map)));
  overlay->present_.set_words(overlay->map_->words());
  return overlay;
}

Overlay::Overlay(Disk& device, UniqueFd fd, std::unique_ptr<OverlayMap> map)
    : Disk(device.size(), device.block_size(), /*writable=*/true),
      device_(device),
      fd_(std::move(fd)),
      map_(std::move(map)),
      present_(div_round_up(device.size(), device.block_size())) {}

Overlay::~Overlay() {
  if (map_) (void)do_flush();  // what cannot be saved now was reported by the last flush
}

Status Overlay::do_read(std::span<std::byte> buffer, uint64_t offset) {
  const uint64_t end = offset + buffer.size();
  const uint64_t block_size = this->block_size();
  for (uint64_t position = offset; position < end;) {
    const uint64_t block = position / block_size;
    const uint64_t last_block = div_round_up(end, block_size);
    const bool in_overlay = present_.test(block);
    const uint64_t run_end_block = in_overlay ? present_.first_clear(block, last_block)
                                              : present_.first_set(block, last_block);
    const uint64_t run_end = std::min(end, run_end_block * block_size);
    const std::span<std::byte> piece = buffer.subspan(position - offset, run_end - position);
    if (in_overlay) {
      LB_RETURN_IF_ERROR(pread_full(fd_.get(), piece, position));
    } else {
      Result<size_t> got = device_.read(piece, position);
      if (!got) return got.status();
    }
    position = run_end;
  }
  return Status::ok();
}

bool Overlay::all_on_device(uint64_t offset, uint64_t length) const {
  const uint64_t first = offset / block_size();
  const uint64_t last = div_round_up(offset + length, block_size());
  return present_.first_set(first, last) >= last;
}

Result<std::optional<std::span<const std::byte>>> Overlay::do_view(uint64_t offset,
                                                                   uint64_t length) {
  // The file's bytes are not mapped: only the device's can be viewed.
  if (!all_on_device(offset, length)) return std::optional<std::span<const std::byte>>();
  return device_.view(offset, length);
}

std::optional<std::span<const std::byte>> Overlay::do_cached_view(uint64_t offset,
                                                                  uint64_t length) {
  if (!all_on_device(offset, length)) return std::nullopt;
  return device_.cached_view(offset, length);
}

bool Overlay::do_read_cached(std::span<std::byte> buffer, uint64_t offset) {
  return all_on_device(offset, buffer.size()) && device_.read_cached(buffer, offset);
}

bool Overlay::do_is_zero(uint64_t offset, uint64_t length) {
  return all_on_device(offset, length) && device_.is_zero(offset, length);
}

void Overlay::do_prefetch(uint64_t offset, uint64_t length) {
  // Only the runs of blocks still on the device need fetching.
  const uint64_t end = offset + length;
  const uint64_t last_block = div_round_up(end, block_size());
  for (uint64_t block = offset / block_size(); block < last_block;) {
    if (present_.test(block)) {
      block = present_.first_clear(block, last_block);
      continue;
    }
    const uint64_t run_end_block = present_.first_set(block, last_block);
    const uint64_t from = std::max(offset, block * block_size());
    device_.prefetch(from, std::min(end, run_end_block * block_size()) - from);
    block = run_end_block;
  }
}

Status Overlay::file_extents(uint64_t offset, uint64_t end, std::vector<DiskExtent>& out) const {
  for (uint64_t position = offset; position < end;) {
    // The next data at or after `position`; none (ENXIO): a hole to the end.
    const off_t data = ::lseek(fd_.get(), static_cast<off_t>(position), SEEK_DATA);
    if (data < 0 && errno != ENXIO) return posix_error("find the overlay's data", errno);
    const uint64_t data_at = data < 0 ? end : std::min<uint64_t>(end, static_cast<uint64_t>(data));
    if (data_at > position) {
      out.push_back({position, data_at - position, DiskExtent::Kind::kZero});
      position = data_at;
      if (position >= end) break;
    }
    const off_t hole = ::lseek(fd_.get(), static_cast<off_t>(position), SEEK_HOLE);
    if (hole < 0) return posix_error("find the overlay's holes", errno);
    const uint64_t hole_at = std::min<uint64_t>(end, static_cast<uint64_t>(hole));
    out.push_back({position, hole_at - position, DiskExtent::Kind::kData});
    position = hole_at;
  }
  return Status::ok();
}

Status Overlay::do_extents(uint64_t offset, uint64_t length, std::vector<DiskExtent>& out) {
  const uint64_t end = offset + length;
  const uint64_t block_size = this->block_size();
  const uint64_t last_block = div_round_up(end, block_size);
  for (uint64_t position = offset; position < end;) {
    const uint64_t block = position / block_size;
    const bool in_overlay = present_.test(block);
    const uint64_t run_end_block = in_overlay ? present_.first_clear(block, last_block)
                                              : present_.first_set(block, last_block);
    const uint64_t run_end = std::min(end, run_end_block * block_size);
    if (in_overlay) {
      LB_RETURN_IF_ERROR(file_extents(position, run_end, out));
    } else {
      Result<std::vector<DiskExtent>> below = device_.extents(position, run_end - position);
      if (!below) return below.status();
      out.insert(out.end(), below->begin(), below->end());
    }
    position = run_end;
  }
  return Status::ok();
}

Disk::Readahead Overlay::readahead() const { return device_.readahead(); }

Status Overlay::write_partial_locked(uint64_t index, uint64_t offset_in_block,
                                     std::span<const std::byte> data) {
  const uint64_t block_offset = index * block_size();
  if (present_.test(index)) {
    return pwrite_all(fd_.get(), data, block_offset + offset_in_block, "the overlay");
  }
  // The block's other bytes come from the device: merged here and written
  // whole, so the file never holds half of a block's old and new bytes.
  std::vector<std::byte> block(block_size());
  Result<size_t> got = device_.read(block, block_offset);
  if (!got) return got.status();
  std::memset(block.data() + *got, 0, block.size() - *got);
  std::memcpy(block.data() + offset_in_block, data.data(), data.size());
  LB_RETURN_IF_ERROR(pwrite_all(fd_.get(), block, block_offset, "the overlay"));
  present_.set_range(index, index + 1);
  return Status::ok();
}

Status Overlay::do_write(std::span<const std::byte> data, uint64_t offset) {
  const uint64_t end = offset + data.size();
  BlockLocks locks(*this, offset / block_size(), (end - 1) / block_size());
  for (uint64_t position = offset; position < end;) {
    const uint64_t block = position / block_size();
    const uint64_t block_begin = block * block_size();
    if (position == block_begin && end - position >= block_size()) {
      // A run of whole blocks: straight to the file, then marked.
      const uint64_t whole = align_down(end - position, block_size());
      LB_RETURN_IF_ERROR(
          pwrite_all(fd_.get(), data.subspan(position - offset, whole), position, "the overlay"));
      present_.set_range(block, block + whole / block_size());
      position += whole;
      continue;
    }
    const uint64_t piece_end = std::min(end, block_begin + block_size());
    LB_RETURN_IF_ERROR(write_partial_locked(block, position - block_begin,
                                            data.subspan(position - offset, piece_end - position)));
    position = piece_end;
  }
  return Status::ok();
}

Status Overlay::do_trim(uint64_t offset, uint64_t length) {
  return do_write_zeroes(offset, length);
}

Status Overlay::do_write_zeroes(uint64_t offset, uint64_t length) {
  const uint64_t end = offset + length;
  const uint64_t first_whole = align_up(offset, block_size());
  const uint64_t last_whole = std::max(first_whole, align_down(end, block_size()));
  static const std::vector<std::byte> kZeros(64 * 1024);
  const auto zero_bytes = [&](uint64_t from, uint64_t to) -> Status {
    for (uint64_t at = from; at < to;) {
      const uint64_t take = std::min<uint64_t>(to - at, kZeros.size());
      LB_RETURN_IF_ERROR(do_write(std::span(kZeros).first(take), at));
      at += take;
    }
    return Status::ok();
  };
  if (first_whole >= end) return zero_bytes(offset, end);
  LB_RETURN_IF_ERROR(zero_bytes(offset, first_whole));
  if (last_whole > first_whole) {
    BlockLocks locks(*this, first_whole / block_size(), last_whole / block_size() - 1);
    // A hole reads as zeros and costs no space.
    if (::fallocate(fd_.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(first_whole),
                    static_cast<off_t>(last_whole - first_whole)) != 0) {
      return posix_error("punch a hole in the overlay", errno);
    }
    present_.set_range(first_whole / block_size(), last_whole / block_size());
  }
  return zero_bytes(last_whole, end);
}

Status Overlay::do_flush() {
  if (!map_) return Status::ok();  // a temporary overlay does not outlive the process
  MutexLock lock(flush_mu_);
  // A round already running may have taken its snapshot before this
  // caller's writes completed: only a round that starts from now covers them.
  const uint64_t needed = rounds_started_ + 1;
  while (rounds_finished_ < needed) {
    if (flushing_) {
      flush_done_.wait(lock);
      continue;
    }
    flushing_ = true;
    ++rounds_started_;
    lock.unlock();
    Status status = flush_round();
    lock.lock();
    flushing_ = false;
    ++rounds_finished_;
    last_round_ = std::move(status);
    flush_done_.notify_all();
  }
  return last_round_;
}

Status Overlay::flush_round() {
  // The order makes a crash at any moment safe: the bits are taken before
  // the data is synced, so every block they name has its bytes on disk
  // before the map that names it is.
  const std::vector<uint64_t> snapshot = present_.words();
  if (::fdatasync(fd_.get()) != 0) return posix_error("sync the overlay", errno);
  return map_->save(snapshot, align_up(size(), block_size()));
}

Result<Overlay::Kept> Overlay::open_kept(const std::filesystem::path& path,
                                         const OverlayIdentity& expected) {
  Result<std::unique_ptr<OverlayMap>> map =
      OverlayMap::open(path, expected, OverlayMap::Access::kRead);
  if (!map) return map.status();
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) {
      return Status::not_found(fmt::format("overlay {} of {}: its data file is missing",
                                           path.string(), expected.to_string()));
    }
    return posix_error("open overlay " + path.string(), errno);
  }
  LB_RETURN_IF_ERROR(check_data_file(fd.get(), path, (*map)->data_file_size()));
  const uint64_t blocks = div_round_up(expected.device_size, expected.block_size);
  std::vector<bool> present(blocks);
  const std::vector<uint64_t>& words = (*map)->words();
  for (uint64_t i = 0; i < blocks; ++i) present[i] = (words[i / 64] >> (i % 64)) & 1;
  return Kept{std::move(fd), std::move(present), std::move(map).value()};
}

}  // namespace lazyblock::image
