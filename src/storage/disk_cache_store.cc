#include "storage/disk_cache_store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <cstring>
#include <vector>

#include <fmt/format.h>
#include <xxhash.h>

#include "common/file_io.h"
#include "common/log.h"
#include "common/units.h"

namespace lazyblock {
namespace {

constexpr char kMagic[8] = {'L', 'B', 'C', 'H', 'U', 'N', 'K', '\0'};
constexpr uint32_t kVersion = 2;
constexpr uint64_t kTrailerSize = 64;
constexpr uint64_t kChecksummedHead = 56;  // the trailer bytes the checksum covers
// The name of a chunk file of this format ends so; a temporary one has
// kTempMark after it.
constexpr std::string_view kSuffix = ".c2";
constexpr std::string_view kTempMark = ".tmp.";
// Partial chunks that no stream holds are kept this many at most (their
// other part may yet come): each costs a descriptor and a temporary file.
constexpr size_t kMaxIdlePartials = 16;

struct Trailer {
  uint64_t index = 0;
  uint64_t chunk_size = 0;
  uint64_t object_size = 0;
  uint64_t id_low = 0;
  uint64_t id_high = 0;
  uint64_t checksum = 0;
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

using TrailerBytes = std::array<std::byte, kTrailerSize>;

// The trailer's bytes; the checksum field as given.
TrailerBytes encode_trailer(const Trailer& trailer) {
  TrailerBytes bytes{};
  std::memcpy(bytes.data(), kMagic, sizeof kMagic);
  put_u32(bytes.data() + 8, kVersion);
  put_u32(bytes.data() + 12, kTrailerSize);
  put_u64(bytes.data() + 16, trailer.index);
  put_u64(bytes.data() + 24, trailer.chunk_size);
  put_u64(bytes.data() + 32, trailer.object_size);
  put_u64(bytes.data() + 40, trailer.id_low);
  put_u64(bytes.data() + 48, trailer.id_high);
  put_u64(bytes.data() + 56, trailer.checksum);
  return bytes;
}

// The trailer, or why it is not one of this format.
Result<Trailer> decode_trailer(const TrailerBytes& bytes) {
  if (std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) {
    return Status::corruption("no chunk trailer");
  }
  const uint32_t version = get_u32(bytes.data() + 8);
  if (version != kVersion || get_u32(bytes.data() + 12) != kTrailerSize) {
    return Status::corruption(fmt::format("chunk trailer version {}, not {}", version, kVersion));
  }
  return Trailer{get_u64(bytes.data() + 16), get_u64(bytes.data() + 24),
                 get_u64(bytes.data() + 32), get_u64(bytes.data() + 40),
                 get_u64(bytes.data() + 48), get_u64(bytes.data() + 56)};
}

// A cache file's bytes [offset, offset + buffer.size()), all of them.
Status pread_all(int fd, std::span<std::byte> buffer, uint64_t offset) {
  Result<size_t> got = pread_up_to(fd, buffer, offset, "cache file");
  if (!got) return got.status();
  if (*got != buffer.size()) return Status::corruption("cache file shorter than its trailer says");
  return Status::ok();
}

// The checksum of a chunk file: XXH3-64 of the first `length` bytes of `fd`
// followed by the trailer's head.
Result<uint64_t> checksum(int fd, uint64_t length, const TrailerBytes& trailer) {
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
  XXH3_64bits_update(state, trailer.data(), kChecksummedHead);
  const uint64_t hash = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  if (!status.is_ok()) return status;
  return hash;
}

// XXH3-128 over `parts`, each as a u64 length, then its bytes: no two lists
// of parts hash the same bytes.
XXH128_hash_t hash_parts(std::initializer_list<std::string_view> parts) {
  std::string bytes;
  for (std::string_view part : parts) {
    std::byte length[8];
    put_u64(length, part.size());
    bytes.append(reinterpret_cast<const char*>(length), sizeof length);
    bytes.append(part);
  }
  return XXH3_128bits(bytes.data(), bytes.size());
}

int64_t mtime_ns(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

bool is_hex(std::string_view text) {
  return text.find_first_not_of("0123456789abcdef") == std::string_view::npos;
}
bool is_decimal(std::string_view text) {
  return !text.empty() && text.find_first_not_of("0123456789") == std::string_view::npos;
}

// Whether `name` is a chunk file of format 1: "<32 hex>.<chunk size>.<index>".
bool is_format_1(std::string_view name) {
  if (name.size() < 36 || !is_hex(name.substr(0, 32)) || name[32] != '.') return false;
  const std::string_view rest = name.substr(33);
  const size_t dot = rest.find('.');
  return dot != std::string_view::npos && is_decimal(rest.substr(0, dot)) &&
         is_decimal(rest.substr(dot + 1));
}

// The pid in a temporary file's name, if it is one: "...tmp.<pid>.<sequence>".
std::optional<pid_t> temp_owner(std::string_view name) {
  const size_t mark = name.rfind(kTempMark);
  if (mark == std::string_view::npos) return std::nullopt;
  const std::string_view rest = name.substr(mark + kTempMark.size());
  const size_t dot = rest.find('.');
  if (dot == std::string_view::npos) return std::nullopt;
  pid_t pid = 0;
  const auto [end, error] = std::from_chars(rest.data(), rest.data() + dot, pid);
  if (error != std::errc() || end != rest.data() + dot) return std::nullopt;
  return pid;
}

// Removes the temporary file `path` if its owner is gone: its lock can be
// taken. True if it was removed.
bool remove_if_abandoned(const std::filesystem::path& path) {
  // Open for writing: on NFS an exclusive flock is a write lock on the server.
  const UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
  if (!fd) return false;
  // The lock goes with the descriptor.
  return ::flock(fd.get(), LOCK_EX | LOCK_NB) == 0 && ::unlink(path.c_str()) == 0;
}

// Unlinks `path` if it still names the file open as `fd` (another process
// may have renamed a good file into place since `fd` was opened).
void unlink_if_same(const std::filesystem::path& path, int fd) {
  struct stat open_file {};
  struct stat named {};
  if (::fstat(fd, &open_file) != 0 || ::stat(path.c_str(), &named) != 0) return;
  if (open_file.st_dev == named.st_dev && open_file.st_ino == named.st_ino) {
    ::unlink(path.c_str());
  }
}

}  // namespace

// The temporary file of one chunk, filled by this process's streams in any
// order, published once every byte is in. Its descriptor holds the flock
// that tells other processes its owner lives.
class DiskCacheStore::PartialChunk {
 public:
  enum class Written { kPending, kReady, kFailed };

  PartialChunk(std::string map_key, std::filesystem::path final_path,
               std::filesystem::path temp_path, UniqueFd fd, uint64_t length, Trailer trailer,
               bool last)
      : map_key_(std::move(map_key)),
        final_path_(std::move(final_path)),
        temp_path_(std::move(temp_path)),
        fd_(std::move(fd)),
        length_(length),
        trailer_(trailer),
        last_(last) {}
  ~PartialChunk() {
    if (!published_) ::unlink(temp_path_.c_str());
  }

  // Writes bytes at `offset` within the chunk. kReady if the chunk became
  // ready to publish with this call (the caller then publishes it).
  Written write(uint64_t offset, std::span<const std::byte> data) {
    MutexLock lock(mu_);
    if (failed_) return Written::kFailed;
    if (published_ || offset >= length_) return Written::kPending;
    data = data.first(std::min<uint64_t>(data.size(), length_ - offset));
    const Status status = pwrite_all(fd_.get(), data, offset, "cache file");
    if (!status.is_ok()) {
      log(LogLevel::kWarn, "cache-dir: cannot cache {}: {}", final_path_.string(),
          status.message());
      failed_ = true;
      return Written::kFailed;
    }
    add_filled(offset, offset + data.size());
    return claim_if_ready() ? Written::kReady : Written::kPending;
  }

  // The object's end was reached and nothing followed. True if the chunk
  // became ready to publish with this call.
  bool confirm_end() {
    MutexLock lock(mu_);
    end_confirmed_ = true;
    return claim_if_ready();
  }

  // Adds the trailer, syncs and renames the file into place. Called once,
  // by the caller that got kReady from write() or true from confirm_end().
  Status finish() {
    TrailerBytes bytes = encode_trailer(trailer_);
    Result<uint64_t> sum = checksum(fd_.get(), length_, bytes);
    if (!sum) return sum.status();
    put_u64(bytes.data() + kChecksummedHead, *sum);
    LB_RETURN_IF_ERROR(pwrite_all(fd_.get(), bytes, length_, "cache file"));
    if (::fsync(fd_.get()) != 0) return posix_error("sync " + temp_path_.string(), errno);
    if (::rename(temp_path_.c_str(), final_path_.c_str()) != 0) {
      return posix_error("rename " + temp_path_.string(), errno);
    }
    MutexLock lock(mu_);
    published_ = true;
    return Status::ok();
  }

  uint64_t file_size() const { return length_ + kTrailerSize; }
  const std::string& map_key() const { return map_key_; }
  const std::filesystem::path& final_path() const { return final_path_; }

  uint64_t last_use = 0;  // guarded by the store's mu_

 private:
  // Requires mu_ held.
  void add_filled(uint64_t begin, uint64_t end) REQUIRES(mu_) {
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
  bool claim_if_ready() REQUIRES(mu_) {
    const bool whole = filled_.size() == 1 && filled_[0].first == 0 && filled_[0].second == length_;
    if (claimed_ || failed_ || !whole || (last_ && !end_confirmed_)) return false;
    claimed_ = true;
    return true;
  }

  const std::string map_key_;
  const std::filesystem::path final_path_;
  const std::filesystem::path temp_path_;
  const UniqueFd fd_;
  const uint64_t length_;
  const Trailer trailer_;  // its checksum filled in by finish()
  const bool last_;        // the object's last chunk

  Mutex mu_;
  std::vector<std::pair<uint64_t, uint64_t>> filled_ GUARDED_BY(mu_);  // merged, sorted
  bool end_confirmed_ GUARDED_BY(mu_) = false;
  bool failed_ GUARDED_BY(mu_) = false;
  bool claimed_ GUARDED_BY(mu_) = false;
  bool published_ GUARDED_BY(mu_) = false;
};

// One range of one object at one version (size and version fixed when it
// is opened): chunks served from their files while they are there, then the
// rest from one stream of the store below.
class DiskCacheStore::Reader final : public RangeReader {
 public:
  Reader(DiskCacheStore& store, std::string key, uint64_t offset, uint64_t range_length,
         ObjectInfo info, IoContext io)
      : store_(store),
        key_(std::move(key)),
        position_(offset),
        end_(offset + range_length),
        info_(std::move(info)),
        range_length_(range_length),
        io_(std::move(io)) {}
  ~Reader() override { close_cached(); }

  void use_cached(uint64_t index, UniqueFd fd) {
    cached_index_ = index;
    cached_fd_ = std::move(fd);
  }
  void use_upstream(std::unique_ptr<RangeReader> upstream) { upstream_ = std::move(upstream); }

  Result<size_t> read(std::span<std::byte> buffer) override {
    if (position_ >= end_) {
      if (upstream_ == nullptr) return size_t{0};
      // Whatever the store says after the promised bytes is passed on (the
      // caller judges it); a clean end at the object's end completes its
      // last chunk.
      Result<size_t> more = upstream_->read(buffer);
      if (more && *more == 0 && end_ == info_.size && info_.size > 0) {
        const uint64_t index = (info_.size - 1) / store_.options_.chunk_size;
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
      if (UniqueFd fd = store_.open_cached(key_, index, info_)) use_cached(index, std::move(fd));
    }
    if (cached_index_ == index && upstream_ == nullptr) {
      const uint64_t chunk_end = std::min(end_, (index + 1) * chunk_size);
      const uint64_t take = std::min<uint64_t>(buffer.size(), chunk_end - position_);
      LB_RETURN_IF_ERROR(
          pread_all(cached_fd_.get(), buffer.first(take), position_ - index * chunk_size)
              .with_context(fmt::format("cache-dir {}: chunk {} of {}",
                                        store_.options_.dir.string(), index, key_)));
      position_ += take;
      return take;
    }
    if (upstream_ == nullptr) {
      Result<std::unique_ptr<RangeReader>> opened =
          store_.open_upstream(key_, position_, end_ - position_, io_);
      if (!opened) return opened.status();
      const ObjectInfo now{(*opened)->object_size(), (*opened)->object_version()};
      if (now != info_) {
        // Bytes of two versions must not meet in one stream.
        return Status::corruption(
            fmt::format("{}: read {}: the object changed while it was read (size {} to {}, version "
                        "'{}' to '{}')",
                        store_.location(), key_, info_.size, now.size, info_.version, now.version));
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

  uint64_t object_size() const override { return info_.size; }
  std::string object_version() const override { return info_.version; }
  uint64_t range_length() const override { return range_length_; }

 private:
  void close_cached() {
    cached_fd_.reset();
    cached_index_ = UINT64_MAX;
  }

  std::shared_ptr<PartialChunk> partial_for(uint64_t index) {
    if (partial_index_ != index) {
      partial_ = store_.partial(key_, index, info_);
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
        switch (chunk->write(at - index * chunk_size, data.first(take))) {
          case PartialChunk::Written::kReady:
            store_.publish(key_, index, *chunk);
            break;
          case PartialChunk::Written::kFailed:
            store_.forget(*chunk);
            partial_.reset();  // this chunk is not cached by this stream
            break;
          case PartialChunk::Written::kPending:
            break;
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
  const ObjectInfo info_;
  const uint64_t range_length_;
  const IoContext io_;
  uint64_t cached_index_ = UINT64_MAX;  // the chunk cached_fd_ holds
  UniqueFd cached_fd_;
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
  std::shared_ptr<DiskCacheStore> store(new DiskCacheStore(std::move(inner), std::move(options)));
  MutexLock lock(store->mu_);
  store->evict_locked();
  return store;
}

DiskCacheStore::DiskCacheStore(std::shared_ptr<ObjectStore> inner, DiskCacheOptions options)
    : StoreLayer(std::move(inner)),
      options_(std::move(options)),
      location_(StoreLayer::location()) {}

DiskCacheStore::~DiskCacheStore() {
  MutexLock lock(mu_);
  partials_.clear();  // their temporary files go with them
  const Counters& c = counters_;
  log(LogLevel::kInfo,
      "cache-dir {}: {} chunks served from it, {} ranges and {} stats asked of the store, {} "
      "chunks published, {} dropped for another object or version, {} dropped as corrupt, {} "
      "temporary files of dead processes removed, {} evicted",
      options_.dir.string(), c.chunk_hits, c.upstream_ranges, c.upstream_stats, c.chunks_published,
      c.stale_dropped, c.corrupt_dropped, c.temps_removed, c.evicted);
}

std::filesystem::path DiskCacheStore::chunk_path(const std::string& key, uint64_t index) const {
  const XXH128_hash_t hash = hash_parts({location_, key});
  const std::string name = fmt::format("{:016x}{:016x}", hash.high64, hash.low64);
  return options_.dir / name.substr(0, 2) /
         fmt::format("{}.{}.{}{}", name, options_.chunk_size, index, kSuffix);
}

DiskCacheStore::ObjectId DiskCacheStore::object_id(const std::string& key,
                                                   const ObjectInfo& info) const {
  const XXH128_hash_t hash = hash_parts({location_, key, info.version});
  return {hash.low64, hash.high64};
}

uint64_t DiskCacheStore::chunk_length(uint64_t index, uint64_t object_size) const {
  const uint64_t begin = std::min(index * options_.chunk_size, object_size);
  return std::min(options_.chunk_size, object_size - begin);
}

void DiskCacheStore::note_info(const std::string& key, const ObjectInfo& info) {
  MutexLock lock(mu_);
  auto [it, inserted] = known_.try_emplace(key, info);
  if (inserted || it->second == info) return;
  log(LogLevel::kInfo,
      "cache-dir: {} changed in the store (size {} to {}, version '{}' to '{}'): chunks cached "
      "of it before are misses",
      key, it->second.size, info.size, it->second.version, info.version);
  it->second = info;
}

std::optional<ObjectInfo> DiskCacheStore::known_info(const std::string& key) const {
  MutexLock lock(mu_);
  auto it = known_.find(key);
  if (it == known_.end()) return std::nullopt;
  return it->second;
}

Result<ObjectInfo> DiskCacheStore::stat_info(const std::string& key, const IoContext& io) {
  {
    MutexLock lock(mu_);
    ++counters_.upstream_stats;
  }
  Result<ObjectInfo> info = StoreLayer::stat_info(key, io);
  if (info) note_info(key, *info);
  return info;
}

Result<std::unique_ptr<RangeReader>> DiskCacheStore::open_upstream(const std::string& key,
                                                                   uint64_t offset, uint64_t length,
                                                                   const IoContext& io) {
  {
    MutexLock lock(mu_);
    ++counters_.upstream_ranges;
  }
  Result<std::unique_ptr<RangeReader>> opened = StoreLayer::open_range(key, offset, length, io);
  if (opened) note_info(key, {(*opened)->object_size(), (*opened)->object_version()});
  return opened;
}

UniqueFd DiskCacheStore::open_cached(const std::string& key, uint64_t index,
                                     const ObjectInfo& info) {
  const std::filesystem::path path = chunk_path(key, index);
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return fd;
  // A file that is not the chunk asked for is a miss; one that is not whole
  // and intact is corrupt. Either way it goes, and the chunk is fetched again.
  const auto drop = [&](bool corrupt, const std::string& why) -> UniqueFd {
    log(corrupt ? LogLevel::kWarn : LogLevel::kInfo, "cache-dir: dropping {} (chunk {} of {}): {}",
        path.string(), index, key, why);
    unlink_if_same(path, fd.get());
    fd.reset();
    MutexLock lock(mu_);
    ++(corrupt ? counters_.corrupt_dropped : counters_.stale_dropped);
    verified_.erase(path);
    return UniqueFd();
  };
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return drop(true, std::strerror(errno));
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < kTrailerSize) return drop(true, "shorter than a trailer");
  TrailerBytes bytes;
  if (Status status = pread_all(fd.get(), bytes, file_size - kTrailerSize); !status.is_ok()) {
    return drop(true, status.message());
  }
  Result<Trailer> trailer = decode_trailer(bytes);
  if (!trailer) return drop(true, trailer.status().message());
  const ObjectId wanted = object_id(key, info);
  if (trailer->id_low != wanted.low || trailer->id_high != wanted.high) {
    return drop(false, "it holds another store's object, or another version of this one");
  }
  if (trailer->index != index || trailer->chunk_size != options_.chunk_size) {
    return drop(false,
                fmt::format("it holds chunk {} of {} bytes", trailer->index, trailer->chunk_size));
  }
  if (trailer->object_size != info.size) {
    return drop(false, fmt::format("it is of the object at {} bytes, the store has {}",
                                   trailer->object_size, info.size));
  }
  const uint64_t length = chunk_length(index, info.size);
  if (length == 0 && !(index == 0 && info.size == 0)) {
    return drop(false, fmt::format("the object's {} bytes end before this chunk", info.size));
  }
  if (file_size != length + kTrailerSize) {
    return drop(true, fmt::format("{} bytes, expected {}", file_size, length + kTrailerSize));
  }
  const std::pair<uint64_t, int64_t> identity{st.st_ino, mtime_ns(st)};
  bool known_good;
  {
    MutexLock lock(mu_);
    auto it = verified_.find(path);
    known_good = it != verified_.end() && it->second == identity;
  }
  if (!known_good) {
    Result<uint64_t> sum = checksum(fd.get(), length, bytes);
    if (!sum) return drop(true, sum.status().message());
    if (*sum != trailer->checksum) return drop(true, "checksum mismatch");
    // A fresh modification time marks the file as recently used.
    ::futimens(fd.get(), nullptr);
    if (::fstat(fd.get(), &st) == 0) {
      MutexLock lock(mu_);
      verified_[path] = {st.st_ino, mtime_ns(st)};
    }
  }
  MutexLock lock(mu_);
  ++counters_.chunk_hits;
  return fd;
}

std::shared_ptr<DiskCacheStore::PartialChunk> DiskCacheStore::partial(const std::string& key,
                                                                      uint64_t index,
                                                                      const ObjectInfo& info) {
  const std::filesystem::path final_path = chunk_path(key, index);
  const ObjectId id = object_id(key, info);
  // Streams of another version of the object fill a file of their own.
  const std::string map_key =
      fmt::format("{} {:016x}{:016x} {}", final_path.string(), id.high, id.low, info.size);
  MutexLock lock(mu_);
  if (auto it = partials_.find(map_key); it != partials_.end()) {
    it->second->last_use = ++partial_uses_;
    return it->second;
  }
  // A chunk already in the directory is written again all the same: the
  // file there may be one a reader would drop, and renaming a good copy over
  // it is harmless.
  std::error_code error;
  std::filesystem::create_directories(final_path.parent_path(), error);
  static std::atomic<uint64_t> sequence{0};
  UniqueFd fd;
  std::filesystem::path temp_path;
  // The lock goes on only after the file exists: a scan of another process
  // may take it first, and remove the file. Then try another name.
  for (int attempt = 0; attempt < 3 && !fd; ++attempt) {
    temp_path = final_path.string() + fmt::format("{}{}.{}", kTempMark, ::getpid(),
                                                  sequence.fetch_add(1, std::memory_order_relaxed));
    fd.reset(::open(temp_path.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
    if (!fd) break;
    struct stat st {};
    if (::flock(fd.get(), LOCK_EX | LOCK_NB) != 0 || ::fstat(fd.get(), &st) != 0 ||
        st.st_nlink == 0) {
      fd.reset();
      errno = EAGAIN;
    }
  }
  if (!fd) {
    log(LogLevel::kWarn, "cache-dir: cannot create {}: {}", temp_path.string(),
        std::strerror(errno));
    return nullptr;
  }
  Trailer trailer;
  trailer.index = index;
  trailer.chunk_size = options_.chunk_size;
  trailer.object_size = info.size;
  trailer.id_low = id.low;
  trailer.id_high = id.high;
  const bool last = (index + 1) * options_.chunk_size >= info.size;
  auto chunk = std::make_shared<PartialChunk>(map_key, final_path, temp_path, std::move(fd),
                                              chunk_length(index, info.size), trailer, last);
  chunk->last_use = ++partial_uses_;
  partials_.emplace(map_key, chunk);
  trim_idle_partials_locked();
  return chunk;
}

void DiskCacheStore::trim_idle_partials_locked() {
  // A partial chunk only this map holds is idle: streams take theirs under
  // mu_, so none can be taking it now.
  std::vector<std::map<std::string, std::shared_ptr<PartialChunk>>::iterator> idle;
  for (auto it = partials_.begin(); it != partials_.end(); ++it) {
    if (it->second.use_count() == 1) idle.push_back(it);
  }
  if (idle.size() <= kMaxIdlePartials) return;
  std::sort(idle.begin(), idle.end(),
            [](const auto& a, const auto& b) { return a->second->last_use < b->second->last_use; });
  for (size_t i = 0; i < idle.size() - kMaxIdlePartials; ++i) partials_.erase(idle[i]);
}

void DiskCacheStore::forget(const PartialChunk& chunk) {
  MutexLock lock(mu_);
  auto it = partials_.find(chunk.map_key());
  if (it != partials_.end() && it->second.get() == &chunk) partials_.erase(it);
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
  MutexLock lock(mu_);
  if (auto it = partials_.find(chunk.map_key());
      it != partials_.end() && it->second.get() == &chunk) {
    partials_.erase(it);  // may destroy `chunk`
  }
  if (!status.is_ok()) return;
  ++counters_.chunks_published;
  total_bytes_ += size;
  if (total_bytes_ > options_.max_bytes) evict_locked();
}

void DiskCacheStore::evict_locked() {
  struct Entry {
    int64_t mtime;
    uint64_t size;
    std::filesystem::path path;
  };
  std::vector<Entry> entries;
  uint64_t total = 0;
  const pid_t self = ::getpid();
  std::error_code error;
  for (const auto& group : std::filesystem::directory_iterator(options_.dir, error)) {
    const std::string group_name = group.path().filename().string();
    if (group_name.size() != 2 || !is_hex(group_name) || !group.is_directory(error)) continue;
    for (const auto& file : std::filesystem::directory_iterator(group.path(), error)) {
      const std::string name = file.path().filename().string();
      struct stat st {};
      if (::lstat(file.path().c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
      if (std::optional<pid_t> owner = temp_owner(name)) {
        // This process's own are alive (and on NFS a second lock of its own
        // would not conflict with the first).
        if (*owner != self && remove_if_abandoned(file.path())) ++counters_.temps_removed;
        continue;
      }
      if (is_format_1(name)) {
        ::unlink(file.path().c_str());
        continue;
      }
      if (!name.ends_with(kSuffix)) continue;  // not ours
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
  std::optional<ObjectInfo> info = known_info(key);
  if (!info && ::access(chunk_path(key, index).c_str(), F_OK) == 0) {
    // A chunk of an object this process has not asked the store about: the
    // store says first which version a file must hold to be served.
    Result<ObjectInfo> checked = stat_info(key, io);
    if (!checked) return checked.status();
    info = *checked;
  }
  if (info) {
    if (offset > info->size) {
      return Status::out_of_range(
          fmt::format("{}: read {}: offset {} is past the object's end at {}", location(), key,
                      offset, info->size));
    }
    if (UniqueFd fd = open_cached(key, index, *info)) {
      const uint64_t range_length = std::min(length, info->size - offset);
      auto reader = std::make_unique<Reader>(*this, key, offset, range_length, *info, io);
      reader->use_cached(index, std::move(fd));
      return std::unique_ptr<RangeReader>(std::move(reader));
    }
  }
  Result<std::unique_ptr<RangeReader>> upstream = open_upstream(key, offset, length, io);
  if (!upstream) return upstream.status();
  ObjectInfo now{(*upstream)->object_size(), (*upstream)->object_version()};
  auto reader =
      std::make_unique<Reader>(*this, key, offset, (*upstream)->range_length(), std::move(now), io);
  reader->use_upstream(std::move(upstream).value());
  return std::unique_ptr<RangeReader>(std::move(reader));
}

std::string DiskCacheStore::describe() const {
  return fmt::format("cache-dir({}) over {}", options_.dir.string(), StoreLayer::describe());
}

DiskCacheStore::Counters DiskCacheStore::counters() const {
  MutexLock lock(mu_);
  return counters_;
}

}  // namespace lazyblock
