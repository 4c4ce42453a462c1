#include "image/overlay_map.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <fmt/format.h>
#include <xxhash.h>

#include "common/file_io.h"
#include "common/units.h"

namespace lazyblock::image {
namespace {

constexpr char kMagic[8] = {'L', 'B', 'O', 'V', 'M', 'A', 'P', '2'};
constexpr char kOldMagic[8] = {'L', 'B', 'O', 'V', 'M', 'A', 'P', '1'};
constexpr uint64_t kPage = 4096;
constexpr size_t kHeaderChecksumAt = kPage - 8;
constexpr size_t kNameAt = 74;
constexpr size_t kMaxName = 255;

void put_u64(std::byte* at, uint64_t value) { std::memcpy(at, &value, 8); }
uint64_t get_u64(const std::byte* at) {
  uint64_t value;
  std::memcpy(&value, at, 8);
  return value;
}

uint64_t bitmap_bytes_for(const OverlayIdentity& identity) {
  return div_round_up(div_round_up(identity.device_size, identity.block_size), 64) * 8;
}

// Locks the whole of `fd` with an open-file-description lock (held as long
// as this descriptor is open, whatever other descriptors of the process do).
Status lock_file(int fd, OverlayMap::Access access, const std::filesystem::path& overlay) {
  struct flock lock {};
  lock.l_type = access == OverlayMap::Access::kWrite ? F_WRLCK : F_RDLCK;
  lock.l_whence = SEEK_SET;
  if (::fcntl(fd, F_OFD_SETLK, &lock) == 0) return Status::ok();
  const std::filesystem::path map = OverlayMap::path_for(overlay);
  if (errno == EAGAIN || errno == EACCES) {
    return Status::already_exists(
        fmt::format("overlay {} is in use by another lazyblock process (its map {} is locked{})",
                    overlay.string(), map.string(),
                    access == OverlayMap::Access::kWrite ? "" : " by a server writing it"));
  }
  return posix_error("lock " + map.string(), errno);
}

}  // namespace

std::string OverlayIdentity::to_string() const {
  return fmt::format("{} of build {} ({} bytes, blocks of {})", name, build.to_string(),
                     device_size, block_size);
}

std::filesystem::path OverlayMap::path_for(const std::filesystem::path& overlay) {
  return overlay.string() + ".map";
}

OverlayMap::OverlayMap(UniqueFd fd, std::filesystem::path path, OverlayIdentity identity)
    : fd_(std::move(fd)), path_(std::move(path)), identity_(std::move(identity)) {}

uint64_t OverlayMap::bitmap_bytes() const { return bitmap_bytes_for(identity_); }
uint64_t OverlayMap::slot_bytes() const { return kPage + align_up(bitmap_bytes(), kPage); }

Result<std::unique_ptr<OverlayMap>> OverlayMap::create(const std::filesystem::path& overlay,
                                                       const OverlayIdentity& identity,
                                                       uint64_t data_file_size) {
  if (identity.name.size() > kMaxName) {
    return Status::invalid_argument(
        fmt::format("device name '{}' is longer than {} bytes", identity.name, kMaxName));
  }
  const std::filesystem::path path = path_for(overlay);
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600));
  if (!fd) {
    if (errno == EEXIST) {
      return Status::already_exists(fmt::format("overlay map {} exists already", path.string()));
    }
    return posix_error("create overlay map " + path.string(), errno);
  }
  std::unique_ptr<OverlayMap> map(new OverlayMap(std::move(fd), path, identity));
  LB_RETURN_IF_ERROR(lock_file(map->fd_.get(), Access::kWrite, overlay));
  // Allocated whole: later saves overwrite in place and never need space.
  const int allocated =
      ::posix_fallocate(map->fd_.get(), 0, static_cast<off_t>(2 * map->slot_bytes()));
  if (allocated != 0) {
    ::unlink(path.c_str());
    return posix_error("allocate overlay map " + path.string(), allocated);
  }
  // Both slots read as zeros now; slot 0 becomes the first valid one.
  const std::vector<uint64_t> empty(map->bitmap_bytes() / 8);
  map->slots_[0] = {0, empty, true, data_file_size};
  map->slots_[1] = {0, empty, true, data_file_size};
  const Slot first{1, empty, true, data_file_size};
  Status written = map->write_slot(0, first);
  if (written.is_ok() && ::fsync(map->fd_.get()) != 0) {
    written = posix_error("sync overlay map " + path.string(), errno);
  }
  if (written.is_ok()) written = sync_parent_directory(path);
  if (!written.is_ok()) {
    ::unlink(path.c_str());
    return written;
  }
  map->slots_[0] = first;
  map->current_ = 0;
  return map;
}

Result<std::unique_ptr<OverlayMap>> OverlayMap::open(const std::filesystem::path& overlay,
                                                     const OverlayIdentity& expected,
                                                     Access access) {
  const std::filesystem::path path = path_for(overlay);
  UniqueFd fd(::open(path.c_str(), (access == Access::kWrite ? O_RDWR : O_RDONLY) | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) {
      return Status::not_found(fmt::format("{} is not a lazyblock overlay: its map {} is missing",
                                           overlay.string(), path.string()));
    }
    return posix_error("open overlay map " + path.string(), errno);
  }
  LB_RETURN_IF_ERROR(lock_file(fd.get(), access, overlay));
  std::byte magic[8];
  Result<size_t> got = pread_up_to(fd.get(), magic, 0, "overlay map " + path.string());
  if (!got) return got.status();
  if (*got == sizeof magic && std::memcmp(magic, kOldMagic, 8) == 0) {
    return Status::corruption(fmt::format(
        "overlay map {} is of an older lazyblock (format 1, which records no base build): "
        "pack it with that version",
        path.string()));
  }
  std::unique_ptr<OverlayMap> map(new OverlayMap(std::move(fd), path, expected));
  for (int slot = 0; slot < 2; ++slot) {
    Result<Slot> read = map->read_slot(slot, expected);
    if (!read) return read.status();
    map->slots_[slot] = std::move(read).value();
  }
  map->current_ = map->slots_[1].sequence > map->slots_[0].sequence ? 1 : 0;
  if (map->slots_[map->current_].sequence == 0) {
    return Status::corruption(fmt::format(
        "overlay map {} is damaged: neither of its two copies verifies", path.string()));
  }
  return map;
}

Result<OverlayMap::Slot> OverlayMap::read_slot(int slot, const OverlayIdentity& expected) const {
  const uint64_t at = static_cast<uint64_t>(slot) * slot_bytes();
  std::byte header[kPage];
  Result<size_t> got = pread_up_to(fd_.get(), header, at, "overlay map " + path_.string());
  if (!got) return got.status();
  // Never written, or torn: the other slot decides, and this one is
  // rewritten whole on its next save.
  const Slot invalid{0, std::vector<uint64_t>(bitmap_bytes() / 8), false, 0};
  if (*got != kPage || std::memcmp(header, kMagic, 8) != 0 ||
      XXH3_64bits(header, kHeaderChecksumAt) != get_u64(header + kHeaderChecksumAt)) {
    return invalid;
  }
  OverlayIdentity found;
  std::memcpy(found.build.bytes.data(), header + 16, 16);
  found.device_size = get_u64(header + 32);
  found.block_size = get_u64(header + 40);
  uint16_t name_length;
  std::memcpy(&name_length, header + 72, 2);
  if (name_length > kMaxName) return invalid;
  found.name.assign(reinterpret_cast<const char*>(header + kNameAt), name_length);
  if (found != expected) {
    return Status::invalid_argument(
        fmt::format("overlay {} belongs to {}, not to {}: it cannot be used over another device",
                    path_.string(), found.to_string(), expected.to_string()));
  }
  const uint64_t bytes = get_u64(header + 56);
  if (bytes != bitmap_bytes()) return invalid;
  Slot read{get_u64(header + 8), std::vector<uint64_t>(bytes / 8), true, get_u64(header + 48)};
  got = pread_up_to(fd_.get(), std::as_writable_bytes(std::span(read.words)), at + kPage,
                    "overlay map " + path_.string());
  if (!got) return got.status();
  if (*got != bytes || XXH3_64bits(read.words.data(), bytes) != get_u64(header + 64)) {
    return invalid;
  }
  return read;
}

Status OverlayMap::write_slot(int slot, const Slot& contents) {
  const uint64_t at = static_cast<uint64_t>(slot) * slot_bytes();
  const std::string what = "overlay map " + path_.string();
  // The bitmap first, only the pages that differ from what the slot holds;
  // the header, which vouches for them, last. Both reach the disk with the
  // caller's one sync; a crash between leaves a slot that does not verify.
  const Slot& before = slots_[slot];
  const auto bytes = std::as_bytes(std::span(contents.words));
  const auto old_bytes = std::as_bytes(std::span(before.words));
  for (uint64_t page = 0; page < bytes.size(); page += kPage) {
    const uint64_t length = std::min<uint64_t>(kPage, bytes.size() - page);
    if (before.known && old_bytes.size() == bytes.size() &&
        std::memcmp(old_bytes.data() + page, bytes.data() + page, length) == 0) {
      continue;
    }
    LB_RETURN_IF_ERROR(pwrite_all(fd_.get(), bytes.subspan(page, length), at + kPage + page, what));
  }
  std::byte header[kPage] = {};
  std::memcpy(header, kMagic, 8);
  put_u64(header + 8, contents.sequence);
  std::memcpy(header + 16, identity_.build.bytes.data(), 16);
  put_u64(header + 32, identity_.device_size);
  put_u64(header + 40, identity_.block_size);
  put_u64(header + 48, contents.data_file_size);
  put_u64(header + 56, bytes.size());
  put_u64(header + 64, XXH3_64bits(bytes.data(), bytes.size()));
  const uint16_t name_length = static_cast<uint16_t>(identity_.name.size());
  std::memcpy(header + 72, &name_length, 2);
  std::memcpy(header + kNameAt, identity_.name.data(), identity_.name.size());
  put_u64(header + kHeaderChecksumAt, XXH3_64bits(header, kHeaderChecksumAt));
  return pwrite_all(fd_.get(), header, at, what);
}

Status OverlayMap::save(const std::vector<uint64_t>& words, uint64_t data_file_size) {
  const int target = 1 - current_;
  const Slot next{slots_[current_].sequence + 1, words, true, data_file_size};
  Status status = write_slot(target, next);
  if (status.is_ok() && ::fdatasync(fd_.get()) != 0) {
    status = posix_error("sync overlay map " + path_.string(), errno);
  }
  if (!status.is_ok()) {
    // What the target slot holds now is unknown: rewritten whole next time.
    slots_[target] = {0, std::vector<uint64_t>(bitmap_bytes() / 8), false, 0};
    return status;
  }
  slots_[target] = next;
  current_ = target;
  return Status::ok();
}

}  // namespace lazyblock::image
