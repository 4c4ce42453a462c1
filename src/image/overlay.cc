#include "image/overlay.h"
#include "common/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>

#include <fmt/format.h>

#include "common/units.h"

namespace lazyblock::image {
namespace {

constexpr char kMapMagic[8] = {'L', 'B', 'O', 'V', 'M', 'A', 'P', '1'};

// Overlay bytes; past the file's end (a disk not a block multiple), zeros.
Status pread_full(int fd, std::span<std::byte> buffer, uint64_t offset) {
  Result<size_t> got = pread_up_to(fd, buffer, offset, "the overlay");
  if (!got) return got.status();
  std::memset(buffer.data() + *got, 0, buffer.size() - *got);
  return Status::ok();
}

std::filesystem::path map_path(const std::filesystem::path& path) {
  return path.string() + ".map";
}

// The block map of a kept overlay.
Result<std::vector<bool>> load_map(const std::filesystem::path& path, uint64_t size,
                                   uint64_t block_size) {
  std::ifstream in(map_path(path), std::ios::binary);
  if (!in) return Status::not_found(fmt::format("overlay map {} is missing", map_path(path).string()));
  char magic[8];
  uint64_t stored_size = 0, stored_block = 0;
  in.read(magic, 8);
  in.read(reinterpret_cast<char*>(&stored_size), 8);
  in.read(reinterpret_cast<char*>(&stored_block), 8);
  if (!in || std::memcmp(magic, kMapMagic, 8) != 0) {
    return Status::corruption(fmt::format("{} is not an overlay map", map_path(path).string()));
  }
  if (stored_size != size || stored_block != block_size) {
    return Status::invalid_argument(fmt::format(
        "overlay {} is of a disk of {} bytes in blocks of {}, not {} in blocks of {}",
        path.string(), stored_size, stored_block, size, block_size));
  }
  const uint64_t blocks = div_round_up(size, block_size);
  std::vector<uint8_t> bits(div_round_up(blocks, 8));
  in.read(reinterpret_cast<char*>(bits.data()), static_cast<std::streamsize>(bits.size()));
  if (!in) return Status::corruption(fmt::format("overlay map {} is truncated", map_path(path).string()));
  std::vector<bool> present(blocks);
  for (uint64_t i = 0; i < blocks; ++i) present[i] = (bits[i / 8] >> (i % 8)) & 1;
  return present;
}

}  // namespace

Result<std::unique_ptr<Overlay>> Overlay::open(Device& device,
                                               std::optional<std::filesystem::path> path,
                                               const std::filesystem::path& temp_dir) {
  const uint64_t size = device.size();
  const uint64_t block = device.header().block_size;
  std::vector<bool> present;
  int fd = -1;
  if (path && std::filesystem::exists(*path)) {
    Result<std::vector<bool>> map = load_map(*path, size, block);
    if (!map) return map.status();
    present = std::move(map).value();
    fd = ::open(path->c_str(), O_RDWR | O_CLOEXEC);
    if (fd < 0) return posix_error("open overlay " + path->string(), errno);
  } else if (path) {
    fd = ::open(path->c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return posix_error("create overlay " + path->string(), errno);
  } else {
    const std::filesystem::path dir = temp_dir.empty() ? temp_directory() : temp_dir;
    fd = ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) return posix_error("create an overlay in " + dir.string(), errno);
  }
  if (::ftruncate(fd, static_cast<off_t>(align_up(size, block))) != 0) {
    const int error = errno;
    ::close(fd);
    return posix_error("size the overlay", error);
  }
  std::unique_ptr<Overlay> overlay(new Overlay(device, fd, std::move(path), size, block));
  for (uint64_t i = 0; i < present.size(); ++i) {
    if (present[i]) overlay->present_.set_range(i, i + 1);
  }
  if (overlay->path_) LB_RETURN_IF_ERROR(overlay->save_map());
  return overlay;
}

Overlay::Overlay(Device& device, int fd, std::optional<std::filesystem::path> path,
                 uint64_t size, uint64_t block_size)
    : device_(device),
      fd_(fd),
      path_(std::move(path)),
      size_(size),
      block_size_(block_size),
      present_(div_round_up(size, block_size)) {}

Overlay::~Overlay() {
  if (path_) (void)flush();  // what cannot be saved now was reported by the last flush
  ::close(fd_);
}

Result<size_t> Overlay::read_at(std::span<std::byte> buffer, uint64_t offset) {
  if (offset >= size_ || buffer.empty()) return size_t{0};
  const uint64_t end = offset + std::min<uint64_t>(buffer.size(), size_ - offset);
  for (uint64_t position = offset; position < end;) {
    const uint64_t block = position / block_size_;
    const uint64_t last_block = div_round_up(end, block_size_);
    const bool in_overlay = present_.test(block);
    const uint64_t run_end_block = in_overlay ? present_.first_clear(block, last_block)
                                              : present_.first_set(block, last_block);
    const uint64_t run_end = std::min(end, run_end_block * block_size_);
    const std::span<std::byte> piece = buffer.subspan(position - offset, run_end - position);
    if (in_overlay) {
      LB_RETURN_IF_ERROR(pread_full(fd_, piece, position));
    } else {
      Result<size_t> got = device_.read_at(piece, position);
      if (!got) return got.status();
    }
    position = run_end;
  }
  return end - offset;
}

Status Overlay::own_block_locked(uint64_t index) {
  if (present_.test(index)) return Status::ok();
  std::vector<std::byte> block(block_size_);
  Result<size_t> got = device_.read_at(block, index * block_size_);
  if (!got) return got.status();
  std::memset(block.data() + *got, 0, block.size() - *got);
  LB_RETURN_IF_ERROR(pwrite_all(fd_, block, index * block_size_, "the overlay"));
  present_.set_range(index, index + 1);
  return Status::ok();
}

Status Overlay::write_at(std::span<const std::byte> data, uint64_t offset) {
  if (offset > size_ || data.size() > size_ - offset) {
    return Status::invalid_argument(fmt::format("write of {} bytes at {} past the disk's end at {}",
                                                data.size(), offset, size_));
  }
  const uint64_t end = offset + data.size();
  for (uint64_t position = offset; position < end;) {
    const uint64_t block = position / block_size_;
    const uint64_t block_begin = block * block_size_;
    if (position == block_begin && end - position >= block_size_) {
      // A run of whole blocks: straight to the file, then marked.
      const uint64_t whole = align_down(end - position, block_size_);
      LB_RETURN_IF_ERROR(pwrite_all(fd_, data.subspan(position - offset, whole), position, "the overlay"));
      present_.set_range(block, block + whole / block_size_);
      position += whole;
      continue;
    }
    // Part of a block: the rest of it comes from the device first.
    const uint64_t piece_end = std::min(end, block_begin + block_size_);
    std::lock_guard lock(lock_for(block));
    LB_RETURN_IF_ERROR(own_block_locked(block));
    LB_RETURN_IF_ERROR(
        pwrite_all(fd_, data.subspan(position - offset, piece_end - position), position,
                   "the overlay"));
    position = piece_end;
  }
  return Status::ok();
}

Status Overlay::write_zeros(uint64_t offset, uint64_t length) {
  if (offset > size_ || length > size_ - offset) {
    return Status::invalid_argument(fmt::format("zeroing {} bytes at {} past the disk's end at {}",
                                                length, offset, size_));
  }
  const uint64_t end = offset + length;
  const uint64_t first_whole = align_up(offset, block_size_);
  const uint64_t last_whole = std::max(first_whole, align_down(end, block_size_));
  static const std::vector<std::byte> kZeros(64 * 1024);
  const auto zero_bytes = [&](uint64_t from, uint64_t to) -> Status {
    for (uint64_t at = from; at < to;) {
      const uint64_t take = std::min<uint64_t>(to - at, kZeros.size());
      LB_RETURN_IF_ERROR(write_at(std::span(kZeros).first(take), at));
      at += take;
    }
    return Status::ok();
  };
  if (first_whole >= end) return zero_bytes(offset, end);
  LB_RETURN_IF_ERROR(zero_bytes(offset, first_whole));
  if (last_whole > first_whole) {
    // A hole reads as zeros and costs no space.
    if (::fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    static_cast<off_t>(first_whole),
                    static_cast<off_t>(last_whole - first_whole)) != 0) {
      return posix_error("punch a hole in the overlay", errno);
    }
    present_.set_range(first_whole / block_size_, last_whole / block_size_);
  }
  return zero_bytes(last_whole, end);
}

Status Overlay::flush() {
  if (::fdatasync(fd_) != 0) return posix_error("sync the overlay", errno);
  if (path_) return save_map();
  return Status::ok();
}

Status Overlay::save_map() const {
  const uint64_t blocks = present_.size();
  std::vector<uint8_t> bits(div_round_up(blocks, 8));
  for (uint64_t i = 0; i < blocks; ++i) {
    if (present_.test(i)) bits[i / 8] |= static_cast<uint8_t>(1u << (i % 8));
  }
  // Written beside, then renamed: a crash leaves the old map or the new.
  const std::filesystem::path target = map_path(*path_);
  const std::filesystem::path temp = target.string() + ".tmp";
  {
    std::ofstream out(temp, std::ios::binary | std::ios::trunc);
    out.write(kMapMagic, 8);
    out.write(reinterpret_cast<const char*>(&size_), 8);
    out.write(reinterpret_cast<const char*>(&block_size_), 8);
    out.write(reinterpret_cast<const char*>(bits.data()), static_cast<std::streamsize>(bits.size()));
    out.flush();
    if (!out) return Status::io_error("write overlay map " + temp.string());
  }
  std::error_code error;
  std::filesystem::rename(temp, target, error);
  if (error) return Status::io_error("rename overlay map: " + error.message());
  return Status::ok();
}

Result<Overlay::Kept> Overlay::load_kept(const std::filesystem::path& path, uint64_t device_size,
                                         uint64_t block_size) {
  Result<std::vector<bool>> map = load_map(path, device_size, block_size);
  if (!map) return map.status();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return posix_error("open overlay " + path.string(), errno);
  return Kept{fd, std::move(map).value()};
}

}  // namespace lazyblock::image
