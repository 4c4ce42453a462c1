#include "image/disk.h"

#include <algorithm>

#include <fmt/format.h>

namespace lazyblock::image {
namespace {

// The end of [offset, offset + length) clipped to `size`; offset < size.
uint64_t clipped_end(uint64_t offset, uint64_t length, uint64_t size) {
  return offset + std::min(length, size - offset);
}

}  // namespace

Result<size_t> Disk::read(std::span<std::byte> buffer, uint64_t offset) {
  if (offset >= size_ || buffer.empty()) return size_t{0};
  const uint64_t length = clipped_end(offset, buffer.size(), size_) - offset;
  LB_RETURN_IF_ERROR(do_read(buffer.first(length), offset));
  return static_cast<size_t>(length);
}

Result<std::optional<std::span<const std::byte>>> Disk::view(uint64_t offset, uint64_t length) {
  if (offset >= size_ || length == 0) return std::optional(std::span<const std::byte>());
  return do_view(offset, clipped_end(offset, length, size_) - offset);
}

std::optional<std::span<const std::byte>> Disk::cached_view(uint64_t offset, uint64_t length) {
  if (offset >= size_ || length == 0) return std::span<const std::byte>();
  return do_cached_view(offset, clipped_end(offset, length, size_) - offset);
}

bool Disk::read_cached(std::span<std::byte> buffer, uint64_t offset) {
  if (offset > size_ || buffer.size() > size_ - offset) return false;
  return buffer.empty() || do_read_cached(buffer, offset);
}

bool Disk::is_zero(uint64_t offset, uint64_t length) {
  if (offset >= size_ || length == 0) return true;
  return do_is_zero(offset, clipped_end(offset, length, size_) - offset);
}

void Disk::prefetch(uint64_t offset, uint64_t length) {
  if (offset >= size_ || length == 0) return;
  do_prefetch(offset, clipped_end(offset, length, size_) - offset);
}

Result<std::vector<DiskExtent>> Disk::extents(uint64_t offset, uint64_t length) {
  std::vector<DiskExtent> out;
  if (offset >= size_ || length == 0) return out;
  LB_RETURN_IF_ERROR(do_extents(offset, clipped_end(offset, length, size_) - offset, out));
  return out;
}

Status Disk::write_to(ByteSink& sink) {
  const Readahead ahead = readahead();
  uint64_t asked_until = 0;
  std::vector<std::byte> scratch;
  for (uint64_t position = 0; position < size_;) {
    const uint64_t until = std::min(size_, position + ahead.window);
    if (asked_until < until) {
      do_prefetch(asked_until, until - asked_until);
      asked_until = until;
    }
    Result<std::vector<DiskExtent>> pieces =
        extents(position, std::min(ahead.piece, size_ - position));
    if (!pieces) return pieces.status();
    for (const DiskExtent& piece : *pieces) {
      if (piece.kind == DiskExtent::Kind::kZero) {
        LB_RETURN_IF_ERROR(sink.write_zeros(piece.length));
        continue;
      }
      // Copied, not a view: a copy out of a cache is checked against a
      // file cut under it, whose holes a view would pass on as zeros.
      scratch.resize(piece.length);
      Result<size_t> got = read(scratch, piece.offset);
      if (!got) return got.status();
      LB_RETURN_IF_ERROR(sink.write(std::span<const std::byte>(scratch).first(*got)));
    }
    position = pieces->back().offset + pieces->back().length;
  }
  return Status::ok();
}

namespace {

Status check_writable(bool writable, uint64_t offset, uint64_t length, uint64_t size,
                      const char* what) {
  if (!writable) return Status::invalid_argument(fmt::format("{}: the disk is read-only", what));
  if (offset > size || length > size - offset) {
    return Status::invalid_argument(
        fmt::format("{} of {} bytes at {} past the disk's end at {}", what, length, offset, size));
  }
  return Status::ok();
}

}  // namespace

Status Disk::write(std::span<const std::byte> data, uint64_t offset) {
  LB_RETURN_IF_ERROR(check_writable(writable_, offset, data.size(), size_, "write"));
  if (data.empty()) return Status::ok();
  return do_write(data, offset);
}

Status Disk::write_zeroes(uint64_t offset, uint64_t length) {
  LB_RETURN_IF_ERROR(check_writable(writable_, offset, length, size_, "zeroing"));
  if (length == 0) return Status::ok();
  return do_write_zeroes(offset, length);
}

Status Disk::trim(uint64_t offset, uint64_t length) {
  LB_RETURN_IF_ERROR(check_writable(writable_, offset, length, size_, "trim"));
  if (length == 0) return Status::ok();
  return do_trim(offset, length);
}

Status Disk::flush() { return writable_ ? do_flush() : Status::ok(); }

// Reached only through the front, which refuses writes to a read-only disk:
// a writable implementation that forgot one of them says so.
Status Disk::do_write(std::span<const std::byte>, uint64_t) {
  return Status::invalid_argument("this disk does not implement write");
}
Status Disk::do_write_zeroes(uint64_t, uint64_t) {
  return Status::invalid_argument("this disk does not implement write_zeroes");
}
Status Disk::do_trim(uint64_t, uint64_t) {
  return Status::invalid_argument("this disk does not implement trim");
}
Status Disk::do_flush() { return Status::ok(); }

}  // namespace lazyblock::image
