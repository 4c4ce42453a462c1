#include "image/verify.h"

#include <openssl/evp.h>

#include <algorithm>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "chunk/frame_codec.h"
#include "common/units.h"
#include "image/device.h"

namespace lazyblock::image {
namespace {

constexpr size_t kReadBatch = 1 * kMiB;

using DigestContext = std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)>;

DigestContext new_sha256() {
  DigestContext context(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  EVP_DigestInit_ex(context.get(), EVP_sha256(), nullptr);
  return context;
}

std::array<uint8_t, 32> finish_sha256(EVP_MD_CTX* context) {
  std::array<uint8_t, 32> out{};
  unsigned int length = 0;
  EVP_DigestFinal_ex(context, out.data(), &length);
  return out;
}

bool is_zero(const std::array<uint8_t, 32>& digest) {
  return std::all_of(digest.begin(), digest.end(), [](uint8_t b) { return b == 0; });
}

std::string hex(const std::array<uint8_t, 32>& digest) {
  std::string out;
  for (uint8_t b : digest) out += fmt::format("{:02x}", b);
  return out;
}

// Reads exactly `out.size()` bytes from `reader`; fewer only where the
// stream ends, returned as the count.
Result<size_t> read_exactly(RangeReader& reader, std::span<std::byte> out) {
  size_t done = 0;
  while (done < out.size()) {
    Result<size_t> got = reader.read(out.subspan(done));
    if (!got) return got.status();
    if (*got == 0) break;
    done += *got;
  }
  return done;
}

// Whether the frames are the whole data file: from 0, one after another in
// both address spaces, to its recorded size.
bool whole_table(const BuildInfo& info) {
  const std::vector<Frame>& frames = info.frame_table.frames;
  uint64_t u = 0, c = 0;
  for (const Frame& f : frames) {
    if (f.start_u != u || f.start_c != c) return false;
    u = f.end_u();
    c = f.end_c();
  }
  return info.size == 0 || u == info.size;
}

Status check_digest(const std::string& key, const BuildInfo& info, EVP_MD_CTX* sha,
                    DataFileCheck& check) {
  const std::array<uint8_t, 32> digest = finish_sha256(sha);
  if (is_zero(info.sha256)) return Status::ok();
  if (digest != info.sha256) {
    return Status::corruption(fmt::format("{}: its {} bytes have SHA-256 {}, the header records {}",
                                          key, check.size, hex(digest), hex(info.sha256)));
  }
  check.sha256_checked = true;
  return Status::ok();
}

Status check_size(const std::string& key, const BuildInfo& info, uint64_t mapped_end,
                  DataFileCheck& check) {
  if (info.size != 0) {
    if (check.size != info.size) {
      return Status::corruption(
          fmt::format("{} holds {} bytes, the header records {}", key, check.size, info.size));
    }
    check.size_checked = true;
  }
  if (check.size < mapped_end) {
    return Status::corruption(fmt::format("{} holds {} bytes, but the mappings read it up to {}",
                                          key, check.size, mapped_end));
  }
  return Status::ok();
}

Result<DataFileCheck> verify_plain(ObjectStore& store, const std::string& key,
                                   const BuildInfo& info, uint64_t mapped_end,
                                   const IoContext& io) {
  DataFileCheck check;
  check.key = key;
  Result<uint64_t> size = store.stat(key, io);
  if (!size) return size.status().with_context("data file");
  check.stored_bytes = *size;
  DigestContext sha = new_sha256();
  if (*size > 0) {
    Result<std::unique_ptr<RangeReader>> reader = store.open_range(key, 0, *size, io);
    if (!reader) return reader.status().with_context("data file");
    std::vector<std::byte> buffer(kReadBatch);
    for (;;) {
      Result<size_t> got = (*reader)->read(buffer);
      if (!got) return got.status().with_context("read " + key);
      if (*got == 0) break;
      EVP_DigestUpdate(sha.get(), buffer.data(), *got);
      check.size += *got;
    }
    if (check.size != *size) {
      return Status::corruption(fmt::format(
          "{}: the store said {} bytes, its stream ended after {}", key, *size, check.size));
    }
  }
  LB_RETURN_IF_ERROR(check_size(key, info, mapped_end, check));
  LB_RETURN_IF_ERROR(check_digest(key, info, sha.get(), check));
  return check;
}

Result<DataFileCheck> verify_frames(ObjectStore& store, const std::string& key,
                                    const BuildInfo& info, uint64_t mapped_end,
                                    const IoContext& io) {
  DataFileCheck check;
  check.key = key;
  const FrameTable& table = info.frame_table;
  const FrameCodec codec = table.codec == Codec::kLz4 ? FrameCodec::kLz4 : FrameCodec::kZstd;
  Result<uint64_t> size = store.stat(key, io);
  if (!size) return size.status().with_context("data file");
  check.stored_bytes = *size;
  const auto frame_name = [&](size_t i) {
    const Frame& f = table.frames[i];
    return fmt::format("{}: frame {} of {} (uncompressed [{}, {}), stored [{}, {}))", key, i,
                       table.frames.size(), f.start_u, f.end_u(), f.start_c, f.end_c());
  };
  Result<std::unique_ptr<RangeReader>> reader = store.open_range(key, 0, *size, io);
  if (!reader) return reader.status().with_context("data file");
  const bool whole = whole_table(info);
  DigestContext sha = new_sha256();
  std::vector<std::byte> stored, plain, skipped(kReadBatch);
  uint64_t position = 0;  // in the stored object
  for (size_t i = 0; i < table.frames.size(); ++i) {
    const Frame& f = table.frames[i];
    if (f.end_c() > *size) {
      return Status::corruption(
          fmt::format("{} is cut short: the object is {} bytes, the frame "
                      "ends at {}",
                      frame_name(i), *size, f.end_c()));
    }
    while (position < f.start_c) {  // a gap of frames this table does not list
      const size_t take = std::min<uint64_t>(skipped.size(), f.start_c - position);
      Result<size_t> got = read_exactly(**reader, std::span(skipped).first(take));
      if (!got) return got.status().with_context("read " + key);
      if (*got != take) {
        return Status::corruption(
            fmt::format("{}: the stream ended at {}", frame_name(i), position + *got));
      }
      position += take;
    }
    stored.resize(f.size_c);
    Result<size_t> got = read_exactly(**reader, stored);
    if (!got) return got.status().with_context("read " + key);
    if (*got != f.size_c) {
      return Status::corruption(
          fmt::format("{} is cut short: the stream ended after {} of its {} "
                      "bytes",
                      frame_name(i), *got, f.size_c));
    }
    position += f.size_c;
    plain.resize(f.size_u);
    if (Status s = decompress_frame(codec, stored, plain); !s.is_ok()) {
      return Status::corruption(fmt::format("{}: {}", frame_name(i), s.message()));
    }
    if (whole) EVP_DigestUpdate(sha.get(), plain.data(), plain.size());
    check.size = f.end_u();
    ++check.frames;
  }
  if (!whole) return check;  // sizes and SHA-256 are of the whole file
  if (position != *size) {
    return Status::corruption(fmt::format("{}: {} bytes follow its last frame (which ends at {})",
                                          key, *size - position, position));
  }
  LB_RETURN_IF_ERROR(check_size(key, info, mapped_end, check));
  LB_RETURN_IF_ERROR(check_digest(key, info, sha.get(), check));
  return check;
}

}  // namespace

Result<DataFileCheck> verify_data_file(ObjectStore& store, const std::string& name,
                                       const BuildInfo& info, uint64_t mapped_end,
                                       const IoContext& io) {
  const std::string key =
      data_key(info.build_id, name) + std::string(data_file_suffix(info.frame_table.codec));
  return info.frame_table.compressed() ? verify_frames(store, key, info, mapped_end, io)
                                       : verify_plain(store, key, info, mapped_end, io);
}

}  // namespace lazyblock::image
