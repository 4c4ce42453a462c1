#include "chunk/frame_chunker.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <map>
#include <stop_token>

#include <fmt/format.h>

#include "cache/block_cache.h"
#include "chunk/cache_copy.h"
#include "common/file_io.h"
#include "common/log.h"
#include "common/mutex.h"
#include "common/task_group.h"

namespace lazyblock {

std::optional<size_t> FrameGeometry::frame_at(uint64_t offset) const {
  const auto after =
      std::upper_bound(frames.begin(), frames.end(), offset,
                       [](uint64_t o, const CompressedFrame& f) { return o < f.offset; });
  if (after == frames.begin()) return std::nullopt;
  const size_t index = static_cast<size_t>(after - frames.begin()) - 1;
  if (offset >= frames[index].offset + frames[index].size) return std::nullopt;
  return index;
}

Status FrameGeometry::validate(uint64_t block_size) const {
  uint64_t least = 0;
  for (size_t i = 0; i < frames.size(); ++i) {
    const CompressedFrame& frame = frames[i];
    if (frame.offset < least) {
      return Status::corruption(
          fmt::format("frame {} starts at {}, inside the frame before it", i, frame.offset));
    }
    if (frame.size == 0 || frame.stored_size == 0) {
      return Status::corruption(fmt::format("frame {} is empty", i));
    }
    if (block_size == 0 || frame.offset % block_size != 0) {
      return Status::corruption(
          fmt::format("frame {} starts at {}, not at a block boundary", i, frame.offset));
    }
    least = frame.offset + frame.size;
  }
  return Status::ok();
}

namespace {

// Rounds of fetch-then-pin before a read gives up on a cache whose
// filesystem is so full that its blocks are given back before they are read.
constexpr int kFetchAttempts = 4;
// A fetch reads a frame's stored bytes into a buffer of this size, decodes
// each piece as it comes, and writes the decoded bytes to the cache once
// there are kWritePiece of them: small enough to be still in the CPU's cache
// when copied, large enough to keep system calls few.
constexpr uint64_t kStoredPiece = 128 * 1024;
constexpr uint64_t kWritePiece = 256 * 1024;

class FrameChunker final : public Chunker, private CachedRanges {
 public:
  FrameChunker(std::shared_ptr<ObjectStore> store, std::string key, FrameGeometry table,
               ChunkerOptions options, std::unique_ptr<BlockCache> cache)
      : store_(std::move(store)),
        key_(std::move(key)),
        table_(std::move(table)),
        options_(std::move(options)),
        cache_(std::move(cache)) {
    for (const CompressedFrame& frame : table_.frames) {
      largest_frame_ = std::max(largest_frame_, frame.size);
    }
  }

  ~FrameChunker() override {
    stop_.request_stop();
    tasks_.wait();
  }

  Result<uint64_t> size() override { return table_.size(); }

  Result<std::span<const std::byte>> slice(uint64_t offset, uint64_t length) override {
    const uint64_t size = table_.size();
    if (length == 0 || offset >= size) return std::span<const std::byte>();
    const uint64_t end = offset + std::min(length, size - offset);
    for (int attempt = 0; attempt < kFetchAttempts; ++attempt) {
      if (!cache_->is_cached(offset, end)) {
        note_read(offset, end);
        LB_RETURN_IF_ERROR(fetch_range(offset, end));
      } else {
        last_read_end_.store(end, std::memory_order_relaxed);
      }
      // Held for this thread, then looked at again: the blocks may have been
      // given back for space since.
      cache_->hold_for_thread(offset, end);
      if (cache_->is_cached(offset, end)) return cache_->slice(offset, end - offset);
    }
    return evicted_status(offset, end);
  }

  std::optional<std::span<const std::byte>> cached_slice(uint64_t offset,
                                                         uint64_t length) override {
    const uint64_t size = table_.size();
    if (offset >= size) return std::nullopt;
    const uint64_t end = offset + std::min(length, size - offset);
    if (!cache_->is_cached(offset, end)) return std::nullopt;
    cache_->hold_for_thread(offset, end);
    if (!cache_->is_cached(offset, end)) return std::nullopt;
    return cache_->slice(offset, end - offset);
  }

  bool read_cached(std::span<std::byte> buffer, uint64_t offset) override {
    const uint64_t size = table_.size();
    if (offset > size || buffer.size() > size - offset) return false;
    return copy_if_cached(*cache_, buffer, offset);
  }

  Result<size_t> read_at(std::span<std::byte> buffer, uint64_t offset) override {
    const uint64_t size = table_.size();
    if (buffer.empty() || offset >= size) return size_t{0};
    const uint64_t end = offset + std::min<uint64_t>(buffer.size(), size - offset);
    Result<size_t> read =
        read_through_cache(*this, *cache_, key_, buffer.first(end - offset), offset);
    if (read && options_.drop_behind) cache_->release(offset, end);
    return read;
  }

  Result<size_t> write_range_to(ByteSink& sink, uint64_t offset, uint64_t length) override {
    const uint64_t size = table_.size();
    if (length == 0 || offset >= size) return size_t{0};
    const uint64_t end = offset + std::min(length, size - offset);
    Result<size_t> written = write_through_cache(*this, *cache_, key_, sink, offset, end);
    if (written && options_.drop_behind) cache_->release(offset, end);
    return written;
  }

  void cancel() override {
    MutexLock lock(mu_);
    cancelled_ = true;
    queued_.clear();
    stop_.request_stop();
    cv_.notify_all();
  }

  Status write_to(ByteSink& sink) override {
    const size_t frames = table_.frames.size();
    for (size_t i = 0; i < frames; ++i) {
      {
        MutexLock lock(mu_);
        const size_t until = std::min(frames, i + frames_in_flight());
        for (size_t ahead = i; ahead < until; ++ahead) start_locked(ahead);
      }
      const CompressedFrame& frame = table_.frames[i];
      Result<BlockCache::Pin> pin = fetch_pinned(frame.offset, frame.offset + frame.size);
      if (!pin) return pin.status();
      LB_RETURN_IF_ERROR(sink.write(cache_->slice(frame.offset, frame.size)));
    }
    return Status::ok();
  }

  void prefetch(uint64_t offset, uint64_t length) override {
    const uint64_t size = table_.size();
    if (length == 0 || offset >= size) return;
    const uint64_t end = offset + std::min(length, size - offset);
    MutexLock lock(mu_);
    for (size_t i = first_frame_from(offset);
         i < table_.frames.size() && table_.frames[i].offset < end; ++i) {
      queued_.push_back(i);
    }
    pump_locked();
  }

  ChunkerStats stats() const override {
    MutexLock lock(mu_);
    return {requests_.load(), bytes_.load(), waiting_, static_cast<uint64_t>(in_flight_.size())};
  }

 private:
  struct Fetch {
    bool done = false;
    Status status;
  };

  // The first frame that ends after `offset`.
  size_t first_frame_from(uint64_t offset) const {
    const auto it = std::upper_bound(
        table_.frames.begin(), table_.frames.end(), offset,
        [](uint64_t o, const CompressedFrame& f) { return o < f.offset + f.size; });
    return static_cast<size_t>(it - table_.frames.begin());
  }

  // Sequential reads keep parallel frames in flight past the read.
  void note_read(uint64_t offset, uint64_t end) {
    const uint64_t previous = last_read_end_.exchange(end, std::memory_order_relaxed);
    if (!options_.readahead || offset != previous) return;
    const std::optional<size_t> at_end = table_.frame_at(end - 1);
    if (!at_end) return;
    const size_t last = *at_end;
    MutexLock lock(mu_);
    const size_t window = frames_in_flight();
    for (size_t i = last + 1; i < table_.frames.size() && i <= last + window; ++i) {
      queued_.push_front(i);
    }
    pump_locked();
  }

  // fetch_range, then a pin on the range once it is cached (a cache short of
  // space may give blocks back between the two: they are fetched again).
  Result<BlockCache::Pin> fetch_pinned(uint64_t offset, uint64_t end) override {
    for (int attempt = 0; attempt < kFetchAttempts; ++attempt) {
      if (!cache_->is_cached(offset, end)) {
        note_read(offset, end);
        LB_RETURN_IF_ERROR(fetch_range(offset, end));
      } else {
        last_read_end_.store(end, std::memory_order_relaxed);
      }
      BlockCache::Pin pin = cache_->pin(offset, end);
      if (cache_->is_cached(offset, end)) return pin;
    }
    return evicted_status(offset, end);
  }

  // Frames are what is fetched: the whole frames the lost bytes lie in.
  void drop_lost(uint64_t offset, uint64_t end) override {
    for (size_t i = first_frame_from(offset);
         i < table_.frames.size() && table_.frames[i].offset < end; ++i) {
      cache_->drop(table_.frames[i].offset, table_.frames[i].offset + table_.frames[i].size);
    }
  }

  Status evicted_status(uint64_t offset, uint64_t end) const {
    return Status::io_error(fmt::format(
        "{} [{}, {}): its cache's filesystem is so full that the bytes were given back {} "
        "times before they could be read",
        key_, offset, end, kFetchAttempts));
  }

  // Fetches every frame [offset, end) touches, all at once, then waits.
  Status fetch_range(uint64_t offset, uint64_t end) {
    // Every byte must lie in a frame: a gap is a range no mapping reaches.
    for (uint64_t at = offset; at < end;) {
      const std::optional<size_t> frame = table_.frame_at(at);
      if (!frame) {
        return Status::corruption(fmt::format(
            "{}: no frame of its table holds byte {} (asked for [{}, {}))", key_, at, offset, end));
      }
      at = table_.frames[*frame].offset + table_.frames[*frame].size;
    }
    const size_t first = *table_.frame_at(offset);
    const size_t last = *table_.frame_at(end - 1);
    MutexLock lock(mu_);
    if (cancelled_) return Status::cancelled(key_ + ": the server is shutting down");
    for (size_t i = first; i <= last; ++i) start_locked(i);
    const Clock::time_point deadline = Clock::now() + options_.fetch_timeout;
    for (size_t i = first; i <= last; ++i) {
      const CompressedFrame& frame = table_.frames[i];
      while (!cache_->is_cached(frame.offset, frame.offset + frame.size)) {
        auto it = in_flight_.find(i);
        if (it == in_flight_.end()) {
          start_locked(i);
          it = in_flight_.find(i);
          if (it == in_flight_.end()) continue;  // cached meanwhile
        }
        const std::shared_ptr<Fetch> fetch = it->second;
        ++waiting_;
        const bool in_time = cv_.wait_until(
            lock, deadline, [&]() REQUIRES(mu_) { return fetch->done || cancelled_; });
        --waiting_;
        if (cancelled_) return Status::cancelled(key_ + ": the server is shutting down");
        if (!in_time) {
          return Status::timeout(fmt::format("{} frame {}: no answer by the deadline", key_, i));
        }
        if (!fetch->status.is_ok()) return fetch->status;
      }
    }
    return Status::ok();
  }

  // Starts fetching frame `index` unless it is cached or under way.
  // Requires mu_ held.
  void start_locked(size_t index) REQUIRES(mu_) {
    const CompressedFrame& frame = table_.frames[index];
    if (cancelled_ || in_flight_.contains(index) ||
        cache_->is_cached(frame.offset, frame.offset + frame.size)) {
      return;
    }
    auto fetch = std::make_shared<Fetch>();
    in_flight_.emplace(index, fetch);
    tasks_.spawn([this, index, fetch] {
      Status status = fetch_frame(index);
      MutexLock lock(mu_);
      fetch->done = true;
      fetch->status = std::move(status);
      in_flight_.erase(index);
      cv_.notify_all();
      pump_locked();
      if (in_flight_.empty()) {
        MutexLock spare_lock(spare_mu_);
        spare_.clear();
      }
    });
  }

  // How many frames readahead keeps in flight: 4 x parallel, so that about
  // parallel of them are transferring while the others wait for their first
  // byte (a 2 MiB zstd frame stores ~0.6 MB: 6 ms of transfer at 100 MB/s
  // against a 20 ms first byte). bench seq --compressed zstd --profile gcs,
  // 3 alternating runs on an idle machine: 559-568 MB/s with parallel in
  // flight, 885-1101 with 4 x parallel, at the same CPU per byte. (At load
  // 20 it once cost CPU instead: there the cores, not the streams, bound.)
  // A frame takes its 2 MiB of buffers only once its first byte is in.
  size_t frames_in_flight() const { return static_cast<size_t>(options_.parallel) * 4; }

  // Starts queued prefetches while fewer than frames_in_flight() run.
  // Requires mu_ held.
  void pump_locked() REQUIRES(mu_) {
    const size_t window = frames_in_flight();
    while (!queued_.empty() && in_flight_.size() < window) {
      const size_t index = queued_.front();
      queued_.pop_front();
      start_locked(index);
    }
  }

  // What one fetch decodes with: kept for the next fetch, as a fresh 2 MiB
  // buffer costs a page fault per page it is decoded into (perf: a sixth of
  // a fetch's CPU) and a fresh zstd context its tables.
  struct FetchBuffers {
    std::unique_ptr<FrameDecoder> decoder;
    std::unique_ptr<std::byte[]> plain;   // the largest frame's size
    std::unique_ptr<std::byte[]> stored;  // kStoredPiece
  };

  Result<std::unique_ptr<FetchBuffers>> take_buffers() {
    {
      MutexLock lock(spare_mu_);
      if (!spare_.empty()) {
        std::unique_ptr<FetchBuffers> buffers = std::move(spare_.back());
        spare_.pop_back();
        return buffers;
      }
    }
    auto buffers = std::make_unique<FetchBuffers>();
    Result<std::unique_ptr<FrameDecoder>> decoder = FrameDecoder::create(table_.codec);
    if (!decoder) return decoder.status();
    buffers->decoder = std::move(decoder).value();
    // Left uninitialised: every byte is written before it is read.
    buffers->plain = std::make_unique_for_overwrite<std::byte[]>(largest_frame_);
    buffers->stored = std::make_unique_for_overwrite<std::byte[]>(kStoredPiece);
    return buffers;
  }

  // Kept while fetches go on (a sequential read has up to a window of
  // frames transferring at once); let go once none is in flight.
  void give_back(std::unique_ptr<FetchBuffers> buffers) {
    MutexLock lock(spare_mu_);
    spare_.push_back(std::move(buffers));
  }

  // On a fetch's thread: the frame's stored bytes, decompressed as they
  // arrive, written to the cache piece by piece (while hot in the CPU's
  // cache), and marked cached only once the whole frame has verified.
  Status fetch_frame(size_t index) {
    const CompressedFrame& frame = table_.frames[index];
    const std::string what =
        fmt::format("{} frame {} (bytes [{}, +{}) stored at [{}, +{}))", key_, index, frame.offset,
                    frame.size, frame.stored_offset, frame.stored_size);
    const IoContext io{Clock::now() + options_.fetch_timeout, stop_.get_token()};
    requests_.fetch_add(1, std::memory_order_relaxed);
    Result<std::unique_ptr<RangeReader>> reader =
        store_->open_range(key_, frame.stored_offset, frame.stored_size, io);
    if (!reader) return reader.status().with_context(what);
    // Taken only now: most frames in flight are waiting for a first byte,
    // and need no buffers for that.
    Result<std::unique_ptr<FetchBuffers>> buffers = take_buffers();
    if (!buffers) return buffers.status();
    const Status status = receive_frame(frame, what, **reader, **buffers);
    give_back(std::move(buffers).value());
    return status;
  }

  Status receive_frame(const CompressedFrame& frame, const std::string& what, RangeReader& reader,
                       FetchBuffers& buffers) {
    FrameDecoder& decoder = *buffers.decoder;
    const std::span<std::byte> plain(buffers.plain.get(), frame.size);
    if (Status s = decoder.begin(plain); !s.is_ok()) return s.with_context(what);
    // Pinned: the frame's blocks must not be punched between a write of
    // its bytes and the mark. The bytes written before the frame verifies
    // are not marked, so no reader sees them unless it does.
    BlockCache::Pin pin = cache_->pin(frame.offset, frame.offset + frame.size);
    const uint64_t drops = cache_->drops();
    uint64_t got = 0;
    uint64_t written = 0;  // of plain, to the cache
    while (got < frame.stored_size) {
      const std::span<std::byte> piece(buffers.stored.get(),
                                       std::min(kStoredPiece, frame.stored_size - got));
      Result<size_t> n = reader.read(piece);
      if (!n) return n.status().with_context(what);
      if (*n == 0) break;
      got += *n;
      bytes_.fetch_add(*n, std::memory_order_relaxed);
      if (Status s = decoder.feed(piece.first(*n)); !s.is_ok()) return s.with_context(what);
      if (decoder.decoded() - written >= kWritePiece) {
        LB_RETURN_IF_ERROR(cache_->write(frame.offset + written,
                                         plain.subspan(written, decoder.decoded() - written)));
        written = decoder.decoded();
      }
    }
    if (got != frame.stored_size) {
      return Status::corruption(fmt::format("{}: the object ends after {} of the frame's {} bytes",
                                            what, got, frame.stored_size));
    }
    if (Status s = decoder.finish(); !s.is_ok()) return s.with_context(what);
    LB_RETURN_IF_ERROR(cache_->write(frame.offset + written, plain.subspan(written)));
    // A drop (the cache file cut short under us) may have taken what was
    // just written: then the frame stays uncached, and its readers fetch it
    // again.
    cache_->mark_cached_unless_dropped(frame.offset, frame.offset + frame.size, drops);
    return Status::ok();
  }

  const std::shared_ptr<ObjectStore> store_;
  const std::string key_;
  const FrameGeometry table_;
  const ChunkerOptions options_;
  const std::unique_ptr<BlockCache> cache_;
  uint64_t largest_frame_ = 0;
  std::stop_source stop_;  // requested when the chunker goes
  std::atomic<uint64_t> requests_{0};
  std::atomic<uint64_t> bytes_{0};
  // Read and written without a lock: a lost update only delays readahead.
  std::atomic<uint64_t> last_read_end_{UINT64_MAX};

  mutable Mutex mu_;
  CondVar cv_;                                                          // a fetch ended
  std::map<size_t, std::shared_ptr<Fetch>> in_flight_ GUARDED_BY(mu_);  // by frame
  std::deque<size_t> queued_ GUARDED_BY(mu_);                           // prefetch and readahead
  uint64_t waiting_ GUARDED_BY(mu_) = 0;
  bool cancelled_ GUARDED_BY(mu_) = false;
  Mutex spare_mu_;  // only fetches take it, never a reader
  std::vector<std::unique_ptr<FetchBuffers>> spare_ GUARDED_BY(spare_mu_);
  TaskGroup tasks_;  // declared last: waited for first
};

}  // namespace

Result<std::unique_ptr<Chunker>> make_frame_chunker(std::shared_ptr<ObjectStore> store,
                                                    std::string key, FrameGeometry table,
                                                    ChunkerOptions options) {
  if (Status s = table.validate(options.block_size); !s.is_ok()) {
    return s.with_context("frame table of " + key);
  }
  if (options.parallel < 1 || options.fetch_timeout.count() <= 0) {
    return Status::invalid_argument("readahead streams and the fetch timeout must be positive");
  }
  const std::filesystem::path dir =
      options.cache_dir.empty() ? temp_directory() : options.cache_dir;
  Result<std::unique_ptr<BlockCache>> cache =
      BlockCache::create(table.size(), options.block_size, dir);
  if (!cache) return cache.status();
  return std::unique_ptr<Chunker>(new FrameChunker(std::move(store), std::move(key),
                                                   std::move(table), std::move(options),
                                                   std::move(cache).value()));
}

}  // namespace lazyblock
