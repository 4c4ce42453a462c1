#include "chunk/chunk_fetch.h"

#include <algorithm>
#include <cassert>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "common/buffer_pool.h"
#include "common/log.h"
#include "common/units.h"

namespace lazyblock {
namespace {

// Bytes asked of the store per read. Large enough that a chunk costs few
// calls (LESSONS: 4 KiB reads cost 1024 calls a chunk); readers return what
// has arrived, so a large buffer never delays a waiter.
constexpr uint64_t kReadBatch = 256 * kKiB;

// A split must win at least this share of a time to first byte: a new
// request for a smaller gain is not worth its cost.
constexpr double kSplitMinGainOfTtfb = 0.25;

// Streams' read buffers, kept across streams and chunkers (see buffer_pool.h).
BufferPool& read_buffers() {
  static BufferPool pool(kReadBatch, 64);
  return pool;
}

double seconds_between(Clock::time_point from, Clock::time_point to) {
  return std::chrono::duration<double>(to - from).count();
}

}  // namespace

ChunkFetch::ChunkFetch(FetchContext& context, uint64_t chunk) : context_(context), chunk_(chunk) {}

Status ChunkFetch::wait_for(MutexLock& lock, uint64_t begin, uint64_t end) {
  context_.mu.assert_held();
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  assert(cache != nullptr);  // callers wait on ranges once the size is known
  if (cache->is_cached(begin, end)) return Status::ok();
  if (context_.stop.stop_requested()) return context_.cancelled_status();
  cover_locked(begin, end);
  maybe_split_locked(begin, end);

  Waiter waiter{begin, end, Clock::now(), false, Status()};
  const uint64_t due = std::min(align_up(end, cache->block_size()), cache->size());
  auto it = waiters_.emplace(due, &waiter);
  context_.waiting.fetch_add(1, std::memory_order_relaxed);
  cv_.wait_until(lock, Clock::now() + context_.options.fetch_timeout, [&] { return waiter.done; });
  context_.waiting.fetch_sub(1, std::memory_order_relaxed);
  if (!waiter.done) waiters_.erase(it);
  if (cache->is_cached(begin, end)) return Status::ok();
  if (waiter.done) return waiter.status;
  return Status::timeout(fmt::format("{}: read {} [{}, {}): no answer by the deadline",
                                     context_.store->location(), context_.key, begin, end));
}

void ChunkFetch::cancel_waiters_locked() {
  context_.mu.assert_held();
  for (auto& [due, waiter] : waiters_) {
    waiter->done = true;
    waiter->status = context_.cancelled_status();
  }
  waiters_.clear();
  cv_.notify_all();
}

void ChunkFetch::cover_locked(uint64_t begin, uint64_t end) {
  context_.mu.assert_held();
  const uint64_t chunk_size = context_.options.chunk_size;
  const uint64_t chunk_begin = chunk_ * chunk_size;
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  if (cache == nullptr) {
    // The size is unknown: the first stream learns it.
    if (streams_.empty()) start_stream_locked(chunk_begin, chunk_begin + chunk_size);
    return;
  }
  const uint64_t block = cache->block_size();
  const uint64_t chunk_end = std::min(chunk_begin + chunk_size, cache->size());
  const Clock::time_point now = Clock::now();
  // A stream past its deadline is ending with a timeout that is no later
  // caller's: cut it past its read in flight, so that its rest is a gap.
  for (const std::shared_ptr<FetchStream>& stream : streams_) {
    if (stream->deadline_ <= now) {
      stream->end_ = std::min(stream->end_, align_up(stream->reading_until_, block));
    }
  }
  // `next` is the first byte of [begin, end) whose block is missing and not
  // yet known to be covered.
  uint64_t next = cache->first_uncached(begin, end);
  while (next < end) {
    const uint64_t gap = align_down(next, block);
    if (FetchStream* covering = stream_covering_locked(gap)) {
      next = cache->first_uncached(std::max(next, covering->end_), end);
      continue;
    }
    // The gap runs back to the previous stream's end (or the chunk's start),
    // so that a stream fetches the leading missing blocks too, and forward
    // to the next stream's start (or the chunk's end).
    uint64_t gap_begin = chunk_begin;
    uint64_t gap_end = chunk_end;
    for (const std::shared_ptr<FetchStream>& stream : streams_) {
      if (stream->end_ <= gap) gap_begin = std::max(gap_begin, stream->end_);
      if (stream->begin_ > gap) gap_end = std::min(gap_end, stream->begin_);
    }
    gap_begin = align_down(cache->first_uncached(gap_begin, gap_end), block);
    start_stream_locked(gap_begin, gap_end);
    next = cache->first_uncached(std::max(next, gap_end), end);
  }
}

void ChunkFetch::maybe_split_locked(uint64_t begin, uint64_t end) {
  if (context_.options.strategy != FetchStrategy::kSplit) return;
  if (static_cast<int>(streams_.size()) >= context_.options.max_streams_per_chunk ||
      context_.streams >= context_.options.max_streams) {
    return;
  }
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  const uint64_t block = cache->block_size();
  const uint64_t first = align_down(cache->first_uncached(begin, end), block);
  FetchStream* stream = stream_covering_locked(first);
  if (stream == nullptr) return;
  // Never cut below what the stream may already be receiving.
  const uint64_t cut = std::max(first, align_up(stream->reading_until_, block));
  const uint64_t need_end = std::min({align_up(end, block), cache->size(), stream->end_});
  if (cut >= need_end) return;

  const LinkEstimate link = context_.estimate;
  const Clock::time_point now = Clock::now();
  // When the running stream would bring the last byte this caller needs...
  double on_stream;
  if (stream->first_byte_at_) {
    on_stream = static_cast<double>(need_end - stream->position_) / link.bytes_per_second;
  } else {
    on_stream = seconds_between(now, stream->opened_at_) + link.ttfb_seconds +
                static_cast<double>(need_end - stream->begin_) / link.bytes_per_second;
  }
  // ...and when a new stream from the cut would.
  const double on_new =
      link.ttfb_seconds + static_cast<double>(need_end - cut) / link.bytes_per_second;
  if (on_new + kSplitMinGainOfTtfb * link.ttfb_seconds >= on_stream) return;

  const uint64_t old_end = stream->end_;
  stream->end_ = cut;
  log(LogLevel::kDebug, "split {} at {}: {:.2f} ms sooner than the running stream", context_.key,
      cut, (on_stream - on_new) * 1e3);
  start_stream_locked(cut, old_end);
}

void ChunkFetch::start_stream_locked(uint64_t begin, uint64_t end) {
  auto stream = std::make_shared<FetchStream>(shared_from_this(), begin, end,
                                              Clock::now() + context_.options.fetch_timeout);
  streams_.push_back(stream);
  ++context_.streams;
  ++context_.busy_streams;
  context_.tasks->spawn([stream] { stream->run(); });
}

FetchStream* ChunkFetch::stream_covering_locked(uint64_t offset) const {
  for (const std::shared_ptr<FetchStream>& stream : streams_) {
    if (stream->begin_ <= offset && offset < stream->end_) return stream.get();
  }
  return nullptr;
}

void ChunkFetch::wake_cached_locked() {
  context_.mu.assert_held();
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  bool woke = false;
  for (auto it = waiters_.begin(); it != waiters_.end();) {
    Waiter& waiter = *it->second;
    if (cache->is_cached(waiter.begin, waiter.end)) {
      waiter.done = true;
      it = waiters_.erase(it);
      woke = true;
    } else {
      ++it;
    }
  }
  if (woke) cv_.notify_all();
}

uint64_t ChunkFetch::next_wake_locked(uint64_t position, uint64_t limit) const {
  context_.mu.assert_held();
  auto it = waiters_.upper_bound(position);
  return it == waiters_.end() ? limit : std::min(limit, it->first);
}

size_t ChunkFetch::waiters_locked() const {
  context_.mu.assert_held();
  return waiters_.size();
}

void ChunkFetch::stream_ended(FetchStream& stream, const Status& status) {
  MutexLock lock(context_.mu);
  --context_.streams;
  if (stream.busy_) {
    stream.busy_ = false;
    --context_.busy_streams;
  }
  std::erase_if(streams_,
                [&](const std::shared_ptr<FetchStream>& s) { return s.get() == &stream; });
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  if (cache != nullptr) wake_cached_locked();
  if (!status.is_ok()) {
    last_error_ = status;
    // The blocks this stream did not deliver: its waiters there fail with it,
    // but for those that came after its deadline had passed: they look again,
    // and get a stream of their own.
    const uint64_t lost_begin =
        cache != nullptr ? align_down(stream.position_, cache->block_size()) : stream.begin_;
    const uint64_t lost_end = stream.end_;
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      Waiter& waiter = *it->second;
      const uint64_t from = std::max(waiter.begin, lost_begin);
      const uint64_t to = std::min(waiter.end, lost_end);
      if (cache == nullptr || (from < to && !cache->is_cached(from, to))) {
        waiter.done = true;
        if (waiter.since < stream.deadline_) waiter.status = status;
        it = waiters_.erase(it);
      } else {
        ++it;
      }
    }
  }
  if (streams_.empty()) {
    // Nothing more will arrive: whoever still waits looks again.
    for (auto& [due, waiter] : waiters_) waiter->done = true;
    waiters_.clear();
    auto it = context_.fetches.find(chunk_);
    if (it != context_.fetches.end() && it->second.get() == this) context_.fetches.erase(it);
  }
  cv_.notify_all();
  context_.size_learned.notify_all();
  context_.pump_readahead_locked();
}

FetchStream::FetchStream(std::shared_ptr<ChunkFetch> fetch, uint64_t begin, uint64_t end,
                         Clock::time_point deadline)
    : fetch_(std::move(fetch)),
      context_(fetch_->context_),
      begin_(begin),
      deadline_(deadline),
      io_{deadline, context_.stop.get_token()},
      name_(fmt::format("{}: read {} [{}, {})", context_.store->location(), context_.key, begin,
                        end)),
      opened_at_(Clock::now()),
      marked_(begin),
      requested_end_(end),
      end_(end),
      position_(begin),
      reading_until_(begin) {}

void FetchStream::run() {
  Status status = stream();
  if (!status.is_ok() && position_ > begin_) {
    // (A stream that failed before its first byte is its fetch's error, and
    // said once there.) The status names the store, the key and the range.
    log(LogLevel::kInfo, "{} (after {} bytes of the stream)", status.to_string(),
        position_ - begin_);
  }
  // Publish what was wholly written, even if the stream failed later: those
  // bytes are right, and may be all a waiter needs.
  if (cache_ != nullptr) advance(position_, /*publish=*/true);
  fetch_->stream_ended(*this, status);
}

Status FetchStream::stream() {
  Result<std::unique_ptr<RangeReader>> opened =
      context_.store->open_range(context_.key, begin_, requested_end_ - begin_, io_);
  context_.requests.fetch_add(1, std::memory_order_relaxed);
  // The store's errors name the store, the key and the range already.
  if (!opened) return opened.status();
  RangeReader& reader = **opened;
  {
    MutexLock lock(context_.mu);
    // The response's headers come with its first byte.
    first_byte_at_ = Clock::now();
    context_.observe_ttfb_locked(
        std::chrono::duration<double>(*first_byte_at_ - opened_at_).count());
    Result<BlockCache*> cache = context_.cache_for_size_locked(reader.object_size());
    if (!cache) return cache.status();
    cache_ = *cache;
    drops_seen_ = cache_->drops();
    if (begin_ > cache_->size()) {
      return Status::out_of_range(fmt::format("{}: the object ends at {}", name_, cache_->size()));
    }
    requested_end_ = std::min(requested_end_, cache_->size());
    end_ = std::min(end_, requested_end_);
    if (reader.range_length() != requested_end_ - begin_) {
      return Status::corruption(fmt::format("{}: the store promised {} bytes, expected {}", name_,
                                            reader.range_length(), requested_end_ - begin_));
    }
  }

  const bool publish_as_we_go = context_.options.strategy != FetchStrategy::kFull;
  BufferPool::Buffer buffer = read_buffers().get();
  const std::span<std::byte> batch = buffer.span();
  uint64_t position = begin_;  // = position_, which only this thread writes
  bool reached_requested_end = false;
  for (;;) {
    bool cached;
    uint64_t want;
    bool others_wait;
    {
      MutexLock lock(context_.mu);
      if (position >= end_) {
        reached_requested_end = end_ == requested_end_;
        break;
      }
      // Read up to the next change between cached and uncached blocks, so a
      // batch is written whole or skipped whole; and stop at the next
      // waiter's end, so it is woken the moment its bytes are in.
      cached = cache_->is_cached(position, position + 1);
      uint64_t stop =
          cached ? cache_->first_uncached(position, end_) : cache_->first_cached(position, end_);
      if (!cached && publish_as_we_go) stop = fetch_->next_wake_locked(position, stop);
      want = std::min(kReadBatch, stop - position);
      reading_until_ = position + want;
      // Waiters of other chunks are waiting on other streams. (Those of
      // this chunk wait on this stream, or are better served by it going
      // on: a sequential reader waits on the very stream that feeds it, and
      // yielding to it would only hand the CPU to other processes.)
      others_wait = context_.waiting.load(std::memory_order_relaxed) > fetch_->waiters_locked();
    }
    LB_RETURN_IF_ERROR(io_.check(name_));
    if (want == kReadBatch && others_wait) {
      // No one waits on this batch while someone waits elsewhere: let the
      // threads that serve them have the CPU first.
      std::this_thread::yield();
    }
    Result<size_t> got = reader.read(batch.first(want));
    if (!got) return got.status();
    if (*got == 0) {
      return Status::corruption(fmt::format("{}: the stream ended after {} of {} bytes", name_,
                                            position - begin_, requested_end_ - begin_));
    }
    // Bytes of blocks cached before this stream got there (after an earlier
    // failure) are dropped: the cache already holds them.
    if (!cached) {
      LB_RETURN_IF_ERROR(cache_->write(position, batch.first(*got)));
    } else {
      const uint64_t block = cache_->block_size();
      const uint64_t from = align_down(position, block);
      const uint64_t to = std::min(align_up(position + *got, block), cache_->size());
      if (!skipped_.empty() && skipped_.back().second >= from) {
        skipped_.back().second = std::max(skipped_.back().second, to);
      } else {
        skipped_.emplace_back(from, to);
      }
    }
    position += *got;
    context_.bytes.fetch_add(*got, std::memory_order_relaxed);
    advance(position, publish_as_we_go);
  }
  if (reached_requested_end) {
    // A stream that goes on past what it promised is not serving this range:
    // its bytes cannot be trusted either. (A cut stream is simply dropped.)
    std::byte extra;
    Result<size_t> more = reader.read(std::span(&extra, 1));
    if (!more) return more.status();
    if (*more != 0) {
      return Status::corruption(
          fmt::format("{}: the stream sent more than the {} bytes "
                      "promised",
                      name_, requested_end_ - begin_));
    }
  }
  if (position - begin_ >= kReadBatch) {
    MutexLock lock(context_.mu);
    context_.observe_bandwidth_locked(
        static_cast<double>(position - begin_) /
        std::chrono::duration<double>(Clock::now() - *first_byte_at_).count());
  }
  return Status::ok();
}

void FetchStream::advance(uint64_t position, bool publish) {
  // Blocks below `position` are wholly written, and so is the object's last
  // block once the stream reaches the object's end.
  const uint64_t written =
      position == cache_->size() ? position : align_down(position, cache_->block_size());
  MutexLock lock(context_.mu);
  if (publish && written > marked_) {
    // Marks what it wrote itself, not what it skipped as cached (punched
    // for space since, perhaps). A drop (the cache file failed under a
    // reader) may have taken bytes it wrote: after a drop, what it has
    // passed is left unmarked (its waiters look again and fetch what is
    // missing).
    bool kept = true;
    uint64_t from = marked_;
    for (const auto& [skip_begin, skip_end] : skipped_) {
      if (skip_begin >= written || !kept) break;
      if (from < skip_begin) {
        kept = cache_->mark_cached_unless_dropped(from, skip_begin, drops_seen_);
      }
      from = std::max(from, skip_end);
    }
    if (kept && from < written) {
      kept = cache_->mark_cached_unless_dropped(from, written, drops_seen_);
    }
    if (!kept) drops_seen_ = cache_->drops();
    std::erase_if(skipped_, [&](const auto& skip) { return skip.second <= written; });
    marked_ = written;
  }
  position_ = position;
  if (publish) fetch_->wake_cached_locked();
  release_if_ending_locked();
}

void FetchStream::release_if_ending_locked() {
  if (!busy_) return;
  const LinkEstimate link = context_.estimate;
  const double rest_seconds = static_cast<double>(end_ - position_) / link.bytes_per_second;
  // This is looked at once per batch read, so a stream is let go one batch
  // early: waiting for the rest to fall under one first-byte time would,
  // where that time is shorter than a batch's transfer (a near server),
  // send the next request only once this one ends, leaving the link idle
  // for a whole round trip per chunk.
  const double batch_seconds = static_cast<double>(kReadBatch) / link.bytes_per_second;
  if (rest_seconds > link.ttfb_seconds + batch_seconds) return;
  busy_ = false;
  --context_.busy_streams;
  context_.pump_readahead_locked();
}

}  // namespace lazyblock
