#include "storage/disk_cache_store.h"
#include "common/file_io.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <vector>

#include <fmt/format.h>
#include <xxhash.h>

#include "common/log.h"
#include "common/units.h"

namespace lazyblock {
namespace {

constexpr char kMagic[8] = {'L', 'B', 'C', 'H', 'U', 'N', 'K', '\0'};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kTrailerSize = 32;
// Temporary files older than this belong to a process that died.
constexpr auto kAbandonedAfter = std::chrono::hours(1);

struct Trailer {
  uint64_t object_size = 0;
  uint64_t data_hash = 0;
};

void put_u32(std::byte* at, uint32_t value) {
  for (int i = 0; i < 4; ++i) at[i] = static_cast<std::byte>(value >> (8 * i));
}
void put_u64(std::byte* at, uint64_t value) {
  for (int i = 0; i < 8; ++i) at[i] = static_cast<std::byte>(value >> (8 * i));
}
uint64_t get_u64(const std::byte* at) {
  uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = value << 8 | static_cast<uint8_t>(at[i]);
  return value;
}
uint32_t get_u32(const std::byte* at) {
  uint32_t value = 0;
  for (int i = 3; i >= 0; --i) value = value << 8 | static_cast<uint8_t>(at[i]);
  return value;
}

std::array<std::byte, kTrailerSize> encode_trailer(const Trailer& trailer) {
  std::array<std::byte, kTrailerSize> bytes{};
  std::memcpy(bytes.data(), kMagic, sizeof kMagic);
  put_u32(bytes.data() + 8, kVersion);
  put_u32(bytes.data() + 12, 0);
  put_u64(bytes.data() + 16, trailer.object_size);
  put_u64(bytes.data() + 24, trailer.data_hash);
  return bytes;
}

// The trailer, or why it is not one.
Result<Trailer> decode_trailer(std::span<const std::byte, kTrailerSize> bytes) {
  if (std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) {
    return Status::corruption("no chunk trailer");
  }
  const uint32_t version = get_u32(bytes.data() + 8);
  if (version != kVersion) {
    return Status::corruption(fmt::format("unknown chunk trailer version {}", version));
  }
  return Trailer{get_u64(bytes.data() + 16), get_u64(bytes.data() + 24)};
}

// A cache file's bytes [offset, offset + buffer.size()), all of them.
Status pread_all(int fd, std::span<std::byte> buffer, uint64_t offset) {
  Result<size_t> got = pread_up_to(fd, buffer, offset, "cache file");
  if (!got) return got.status();
  if (*got != buffer.size()) return Status::corruption("cache file shorter than its trailer says");
  return Status::ok();
}

// XXH3-64 of the first `length` bytes of `fd`.
Result<uint64_t> hash_file(int fd, uint64_t length) {
  XXH3_state_t* state = XXH3_createState();
  if (state == nullptr) return Status::io_error("out of memory hashing a cache file");
  XXH3_64bits_reset(state);
  std::vector<std::byte> buffer(256 * kKiB);
  Status status;
  for (uint64_t offset = 0; offset < length && status.is_ok();) {
    const uint64_t take = std::min<uint64_t>(buffer.size(), length - offset);
    status = pread_all(fd, std::span(buffer).first(take), offset);
    if (status.is_ok()) XXH3_64bits_update(state, buffer.data(), take);
    offset += take;
  }
  const uint64_t hash = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  if (!status.is_ok()) return status;
  return hash;
}

int64_t mtime_ns(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

}  // namespace

// The temporary file of one chunk, filled by this process's streams in any
// order, published once every byte is in.
class DiskCacheStore::PartialChunk {
 public:
  PartialChunk(std::filesystem::path final_path, std::filesystem::path temp_path, int fd,
               uint64_t length, uint64_t object_size, bool last)
      : final_path_(std::move(final_path)),
        temp_path_(std::move(temp_path)),
        fd_(fd),
        length_(length),
        object_size_(object_size),
        last_(last) {}
  ~PartialChunk() {
    ::close(fd_);
    if (!published_) ::unlink(temp_path_.c_str());
  }

  // Writes bytes at `offset` within the chunk. True if the chunk became
  // ready to publish with this call.
  bool write(uint64_t offset, std::span<const std::byte> data) {
    std::lock_guard lock(mu_);
    if (failed_ || published_ || offset >= length_) return false;
    data = data.first(std::min<uint64_t>(data.size(), length_ - offset));
    const Status status = pwrite_all(fd_, data, offset, "cache file");
    if (!status.is_ok()) {
      log(LogLevel::kWarn, "cache-dir: cannot cache {}: {}", final_path_.string(),
          status.message());
      failed_ = true;
      return false;
    }
    add_filled(offset, offset + data.size());
    return claim_if_ready();
  }

  // The object's end was reached and nothing followed. True if the chunk
  // became ready to publish with this call.
  bool confirm_end() {
    std::lock_guard lock(mu_);
    end_confirmed_ = true;
    return claim_if_ready();
  }

  // Adds the trailer, syncs and renames the file into place. Called once,
  // by the caller that got true from write() or confirm_end().
  Status finish() {
    Result<uint64_t> hash = hash_file(fd_, length_);
    if (!hash) return hash.status();
    const auto trailer = encode_trailer({object_size_, *hash});
    LB_RETURN_IF_ERROR(pwrite_all(fd_, trailer, length_, "cache file"));
    if (::fsync(fd_) != 0) return posix_error("sync " + temp_path_.string(), errno);
    if (::rename(temp_path_.c_str(), final_path_.c_str()) != 0) {
      return posix_error("rename " + temp_path_.string(), errno);
    }
    std::lock_guard lock(mu_);
    published_ = true;
    return Status::ok();
  }

  uint64_t file_size() const { return length_ + kTrailerSize; }
  const std::filesystem::path& final_path() const { return final_path_; }

 private:
  // Requires mu_ held.
  void add_filled(uint64_t begin, uint64_t end) {
    filled_.emplace_back(begin, end);
    std::sort(filled_.begin(), filled_.end());
    std::vector<std::pair<uint64_t, uint64_t>> merged;
    for (const auto& [b, e] : filled_) {
      if (!merged.empty() && b <= merged.back().second) {
        merged.back().second = std::max(merged.back().second, e);
      } else {
        merged.emplace_back(b, e);
      }
    }
    filled_ = std::move(merged);
  }
  // Requires mu_ held.
  bool claim_if_ready() {
    const bool whole = filled_.size() == 1 && filled_[0].first == 0 &&
                       filled_[0].second == length_;
    if (claimed_ || failed_ || !whole || (last_ && !end_confirmed_)) return false;
    claimed_ = true;
    return true;
  }

  const std::filesystem::path final_path_;
  const std::filesystem::path temp_path_;
  const int fd_;
  const uint64_t length_;
  const uint64_t object_size_;
  const bool last_;  // the object's last chunk

  std::mutex mu_;
  std::vector<std::pair<uint64_t, uint64_t>> filled_;  // merged, sorted; guarded by mu_
  bool end_confirmed_ = false;                         // guarded by mu_
  bool failed_ = false;                                // guarded by mu_
  bool claimed_ = false;                               // guarded by mu_
  bool published_ = false;                             // guarded by mu_
};

class DiskCacheStore::Reader final : public RangeReader {
 public:
  Reader(DiskCacheStore& store, std::string key, uint64_t offset, uint64_t range_length,
         uint64_t object_size, IoContext io)
      : store_(store),
        key_(std::move(key)),
        position_(offset),
        end_(offset + range_length),
        object_size_(object_size),
        range_length_(range_length),
        io_(std::move(io)) {}
  ~Reader() override { close_cached(); }

  void use_cached(uint64_t index, int fd) {
    cached_index_ = index;
    cached_fd_ = fd;
  }
  void use_upstream(std::unique_ptr<RangeReader> upstream) { upstream_ = std::move(upstream); }

  Result<size_t> read(std::span<std::byte> buffer) override {
    if (position_ >= end_) {
      if (upstream_ == nullptr) return size_t{0};
      // Whatever the store says after the promised bytes is passed on (the
      // caller judges it); a clean end at the object's end completes its
      // last chunk.
      Result<size_t> more = upstream_->read(buffer);
      if (more && *more == 0 && end_ == object_size_ && object_size_ > 0) {
        const uint64_t index = (object_size_ - 1) / store_.options_.chunk_size;
        if (std::shared_ptr<PartialChunk> chunk = partial_for(index)) {
          if (chunk->confirm_end()) store_.publish(key_, index, *chunk);
        }
      }
      return more;
    }
    const uint64_t chunk_size = store_.options_.chunk_size;
    const uint64_t index = position_ / chunk_size;
    if (upstream_ == nullptr && cached_index_ != index) {
      close_cached();
      if (std::optional<CachedChunk> cached = store_.open_cached(key_, index)) {
        if (cached->object_size != object_size_) {
          ::close(cached->fd);
          return Status::corruption(fmt::format(
              "cache-dir: chunk {} of {} says the object has {} bytes, the store said {}", index,
              key_, cached->object_size, object_size_));
        }
        use_cached(index, cached->fd);
      }
    }
    if (cached_index_ == index && upstream_ == nullptr) {
      const uint64_t chunk_end = std::min(end_, (index + 1) * chunk_size);
      const uint64_t take = std::min<uint64_t>(buffer.size(), chunk_end - position_);
      LB_RETURN_IF_ERROR(pread_all(cached_fd_, buffer.first(take), position_ - index * chunk_size)
                             .with_context("cache-dir: " + key_));
      position_ += take;
      return take;
    }
    if (upstream_ == nullptr) {
      Result<std::unique_ptr<RangeReader>> opened =
          store_.StoreLayer::open_range(key_, position_, end_ - position_, io_);
      if (!opened) return opened.status();
      if ((*opened)->object_size() != object_size_) {
        return Status::corruption(fmt::format(
            "cache-dir: the store says {} has {} bytes, its cached chunks say {}", key_,
            (*opened)->object_size(), object_size_));
      }
      upstream_ = std::move(opened).value();
    }
    const uint64_t take = std::min<uint64_t>(buffer.size(), end_ - position_);
    Result<size_t> got = upstream_->read(buffer.first(take));
    if (!got || *got == 0) return got;  // an early end: the caller sees the length fall short
    write_through(buffer.first(*got));
    position_ += *got;
    return got;
  }

  uint64_t object_size() const override { return object_size_; }
  uint64_t range_length() const override { return range_length_; }

 private:
  void close_cached() {
    if (cached_fd_ >= 0) ::close(cached_fd_);
    cached_fd_ = -1;
    cached_index_ = UINT64_MAX;
  }

  std::shared_ptr<PartialChunk> partial_for(uint64_t index) {
    if (partial_index_ != index) {
      partial_ = store_.partial(key_, index, object_size_);
      partial_index_ = index;
    }
    return partial_;
  }

  // Copies bytes that arrived at position_ into their chunks' files.
  void write_through(std::span<const std::byte> data) {
    const uint64_t chunk_size = store_.options_.chunk_size;
    uint64_t at = position_;
    while (!data.empty()) {
      const uint64_t index = at / chunk_size;
      const uint64_t take = std::min<uint64_t>(data.size(), (index + 1) * chunk_size - at);
      if (std::shared_ptr<PartialChunk> chunk = partial_for(index)) {
        if (chunk->write(at - index * chunk_size, data.first(take))) {
          store_.publish(key_, index, *chunk);
        }
      }
      data = data.subspan(take);
      at += take;
    }
  }

  DiskCacheStore& store_;
  const std::string key_;
  uint64_t position_;  // the next byte to deliver
  const uint64_t end_;
  const uint64_t object_size_;
  const uint64_t range_length_;
  const IoContext io_;
  uint64_t cached_index_ = UINT64_MAX;  // the chunk cached_fd_ holds
  int cached_fd_ = -1;
  // Once opened, the store's stream serves the rest of the range, cached
  // chunks or not: its bytes are on their way anyway.
  std::unique_ptr<RangeReader> upstream_;
  uint64_t partial_index_ = UINT64_MAX;
  std::shared_ptr<PartialChunk> partial_;
};

Result<std::shared_ptr<DiskCacheStore>> DiskCacheStore::open(std::shared_ptr<ObjectStore> inner,
                                                             DiskCacheOptions options) {
  if (options.dir.empty()) return Status::invalid_argument("--cache-dir needs a directory");
  if (options.chunk_size == 0) return Status::invalid_argument("cache-dir: chunk size is 0");
  std::error_code error;
  std::filesystem::create_directories(options.dir, error);
  if (error || ::access(options.dir.c_str(), R_OK | W_OK | X_OK) != 0) {
    return Status::io_error(fmt::format("cache-dir {}: cannot use it: {}", options.dir.string(),
                                        error ? error.message() : std::strerror(errno)));
  }
  return std::shared_ptr<DiskCacheStore>(new DiskCacheStore(std::move(inner), std::move(options)));
}

DiskCacheStore::DiskCacheStore(std::shared_ptr<ObjectStore> inner, DiskCacheOptions options)
    : StoreLayer(std::move(inner)), options_(std::move(options)) {}

DiskCacheStore::~DiskCacheStore() = default;

std::filesystem::path DiskCacheStore::chunk_path(const std::string& key, uint64_t index) const {
  const XXH128_hash_t hash = XXH3_128bits(key.data(), key.size());
  const std::string name = fmt::format("{:016x}{:016x}", hash.high64, hash.low64);
  return options_.dir / name.substr(0, 2) /
         fmt::format("{}.{}.{}", name, options_.chunk_size, index);
}

std::optional<DiskCacheStore::CachedChunk> DiskCacheStore::open_cached(const std::string& key,
                                                                       uint64_t index) {
  const std::filesystem::path path = chunk_path(key, index);
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return std::nullopt;
  const auto drop = [&](const std::string& why) -> std::optional<CachedChunk> {
    log(LogLevel::kWarn, "cache-dir: dropping {} (chunk {} of {}): {}", path.string(), index, key,
        why);
    ::close(fd);
    ::unlink(path.c_str());
    std::lock_guard lock(mu_);
    ++counters_.corrupt_dropped;
    verified_.erase(path);
    return std::nullopt;
  };
  struct stat st{};
  if (::fstat(fd, &st) != 0) return drop(std::strerror(errno));
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < kTrailerSize) return drop("shorter than a trailer");
  std::array<std::byte, kTrailerSize> bytes;
  if (Status status = pread_all(fd, bytes, file_size - kTrailerSize); !status.is_ok()) {
    return drop(status.message());
  }
  Result<Trailer> trailer = decode_trailer(bytes);
  if (!trailer) return drop(trailer.status().message());
  const uint64_t begin = index * options_.chunk_size;
  if (begin >= trailer->object_size && !(index == 0 && trailer->object_size == 0)) {
    return drop(fmt::format("the object's {} bytes end before this chunk", trailer->object_size));
  }
  const uint64_t length = std::min(options_.chunk_size, trailer->object_size - begin);
  if (file_size != length + kTrailerSize) {
    return drop(fmt::format("{} bytes, expected {}", file_size, length + kTrailerSize));
  }
  const std::pair<uint64_t, int64_t> identity{st.st_ino, mtime_ns(st)};
  bool known_good;
  {
    std::lock_guard lock(mu_);
    auto it = verified_.find(path);
    known_good = it != verified_.end() && it->second == identity;
  }
  if (!known_good) {
    Result<uint64_t> hash = hash_file(fd, length);
    if (!hash) return drop(hash.status().message());
    if (*hash != trailer->data_hash) return drop("checksum mismatch");
    // A fresh modification time marks the file as recently used.
    ::futimens(fd, nullptr);
    if (::fstat(fd, &st) == 0) {
      std::lock_guard lock(mu_);
      verified_[path] = {st.st_ino, mtime_ns(st)};
    }
  }
  std::lock_guard lock(mu_);
  ++counters_.chunk_hits;
  return CachedChunk{fd, trailer->object_size};
}

std::shared_ptr<DiskCacheStore::PartialChunk> DiskCacheStore::partial(const std::string& key,
                                                                      uint64_t index,
                                                                      uint64_t object_size) {
  const std::filesystem::path final_path = chunk_path(key, index);
  std::lock_guard lock(mu_);
  if (auto it = partials_.find(final_path); it != partials_.end()) return it->second;
  // A chunk already in the directory is written again all the same: the
  // file there may be one a reader would drop, and renaming a good copy over
  // it is harmless.
  std::shared_ptr<PartialChunk>& chunk = partials_[final_path];
  static std::atomic<uint64_t> sequence{0};
  const std::filesystem::path temp_path =
      final_path.string() +
      fmt::format(".tmp.{}.{}", ::getpid(), sequence.fetch_add(1, std::memory_order_relaxed));
  std::error_code error;
  std::filesystem::create_directories(final_path.parent_path(), error);
  const int fd = ::open(temp_path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (fd < 0) {
    log(LogLevel::kWarn, "cache-dir: cannot create {}: {}", temp_path.string(),
        std::strerror(errno));
    partials_.erase(final_path);
    return nullptr;
  }
  const uint64_t begin = index * options_.chunk_size;
  const uint64_t length = std::min(options_.chunk_size, object_size - std::min(begin, object_size));
  const bool last = begin + options_.chunk_size >= object_size;
  chunk = std::make_shared<PartialChunk>(final_path, temp_path, fd, length, object_size, last);
  return chunk;
}

void DiskCacheStore::publish(const std::string& key, uint64_t index, PartialChunk& chunk) {
  const Status status = chunk.finish();
  if (!status.is_ok()) {
    log(LogLevel::kWarn, "cache-dir: cannot publish chunk {} of {}: {}", index, key,
        status.message());
  } else {
    log(LogLevel::kDebug, "cache-dir: published chunk {} of {}", index, key);
  }
  const uint64_t size = chunk.file_size();
  const std::filesystem::path final_path = chunk.final_path();
  std::lock_guard lock(mu_);
  partials_.erase(final_path);  // may destroy `chunk`
  if (!status.is_ok()) return;
  ++counters_.chunks_published;
  if (!total_bytes_) {
    evict_locked();  // learns the total
  } else {
    *total_bytes_ += size;
    if (*total_bytes_ > options_.max_bytes) evict_locked();
  }
}

void DiskCacheStore::evict_locked() {
  struct Entry {
    int64_t mtime;
    uint64_t size;
    std::filesystem::path path;
  };
  std::vector<Entry> entries;
  uint64_t total = 0;
  const int64_t abandoned_before =
      std::chrono::duration_cast<std::chrono::nanoseconds>(
          (std::chrono::system_clock::now() - kAbandonedAfter).time_since_epoch())
          .count();
  std::error_code error;
  for (const auto& group : std::filesystem::directory_iterator(options_.dir, error)) {
    if (!group.is_directory(error)) continue;
    for (const auto& file : std::filesystem::directory_iterator(group.path(), error)) {
      struct stat st{};
      if (::stat(file.path().c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
      const bool temporary = file.path().filename().string().find(".tmp.") != std::string::npos;
      if (temporary) {
        if (mtime_ns(st) < abandoned_before) ::unlink(file.path().c_str());
        continue;
      }
      entries.push_back({mtime_ns(st), static_cast<uint64_t>(st.st_size), file.path()});
      total += static_cast<uint64_t>(st.st_size);
    }
  }
  if (total > options_.max_bytes) {
    std::sort(entries.begin(), entries.end(),
              [](const Entry& a, const Entry& b) { return a.mtime < b.mtime; });
    const uint64_t target = options_.max_bytes / 10 * 9;
    for (const Entry& entry : entries) {
      if (total <= target) break;
      if (::unlink(entry.path.c_str()) == 0) {
        total -= entry.size;
        ++counters_.evicted;
        verified_.erase(entry.path);
      }
    }
  }
  total_bytes_ = total;
}

Result<std::unique_ptr<RangeReader>> DiskCacheStore::open_range(const std::string& key,
                                                                uint64_t offset, uint64_t length,
                                                                const IoContext& io) {
  const uint64_t index = offset / options_.chunk_size;
  if (std::optional<CachedChunk> cached = open_cached(key, index)) {
    if (offset > cached->object_size) {
      ::close(cached->fd);
      return Status::out_of_range(fmt::format("read {}: offset {} is past the object's end at {}",
                                              key, offset, cached->object_size));
    }
    const uint64_t range_length = std::min(length, cached->object_size - offset);
    auto reader =
        std::make_unique<Reader>(*this, key, offset, range_length, cached->object_size, io);
    reader->use_cached(index, cached->fd);
    return std::unique_ptr<RangeReader>(std::move(reader));
  }
  Result<std::unique_ptr<RangeReader>> upstream = StoreLayer::open_range(key, offset, length, io);
  if (!upstream) return upstream.status();
  auto reader = std::make_unique<Reader>(*this, key, offset, (*upstream)->range_length(),
                                         (*upstream)->object_size(), io);
  reader->use_upstream(std::move(upstream).value());
  return std::unique_ptr<RangeReader>(std::move(reader));
}

std::string DiskCacheStore::describe() const {
  return fmt::format("cache-dir({}) over {}", options_.dir.string(), StoreLayer::describe());
}

DiskCacheStore::Counters DiskCacheStore::counters() const {
  std::lock_guard lock(mu_);
  return counters_;
}

}  // namespace lazyblock
