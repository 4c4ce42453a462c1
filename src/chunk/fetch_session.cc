#include "chunk/fetch_session.h"

#include <algorithm>
#include <cassert>
#include <vector>

#include <fmt/format.h>

#include "common/log.h"
#include "common/units.h"

namespace lazyblock {
namespace {

// Bytes asked of the store per read. Large enough that a chunk costs few
// calls (LESSONS: 4 KiB reads cost 1024 calls a chunk); readers return what
// has arrived, so a large buffer never delays a waiter.
constexpr uint64_t kReadBatch = 256 * kKiB;

}  // namespace

Result<BlockCache*> FetchContext::cache_for_size_locked(uint64_t size) {
  if (BlockCache* existing = cache.load(std::memory_order_acquire)) {
    if (existing->size() != size) {
      return Status::corruption(fmt::format("object {} changed size: was {} bytes, the store now "
                                            "reports {}",
                                            key, existing->size(), size));
    }
    return existing;
  }
  std::filesystem::path dir = options.cache_dir;
  if (dir.empty()) {
    const char* tmp = std::getenv("TMPDIR");
    dir = tmp != nullptr && *tmp != '\0' ? tmp : "/tmp";
  }
  Result<std::unique_ptr<BlockCache>> created = BlockCache::create(size, options.block_size, dir);
  if (!created) return created.status().with_context("cache for " + key);
  cache_owner = std::move(created).value();
  cache.store(cache_owner.get(), std::memory_order_release);
  size_learned.notify_all();
  return cache_owner.get();
}

FetchSession::FetchSession(FetchContext& context, uint64_t chunk, uint64_t begin, uint64_t end,
                           Clock::time_point deadline)
    : context_(context),
      chunk_(chunk),
      begin_(begin),
      deadline_(deadline),
      io_{deadline, context.stop.get_token()},
      name_(fmt::format("{} [{}, {})", context.key, begin, end)),
      end_(end),
      position_(begin),
      marked_(begin),
      next_wake_(end) {}

void FetchSession::run() {
  Status status = stream();
  if (!status.is_ok()) {
    log(LogLevel::kInfo, "fetch of {} failed after {} bytes: {}", name_, marked_ - begin_,
        status.to_string());
  }
  // The fetch is over: publish what was wholly written (those bytes are
  // right even if the stream failed later, and may be all a waiter needs).
  if (cache_ != nullptr) publish(position_);
  std::lock_guard lock(context_.mu);
  finished_ = true;
  status_ = std::move(status);
  auto it = context_.sessions.find(chunk_);
  if (it != context_.sessions.end() && it->second.get() == this) context_.sessions.erase(it);
  for (auto& [end, waiter] : waiters_) waiter->woken = true;
  waiters_.clear();
  cv_.notify_all();
  context_.size_learned.notify_all();
}

Status FetchSession::stream() {
  Result<std::unique_ptr<RangeReader>> opened =
      context_.store->open_range(context_.key, begin_, end_ - begin_, io_);
  context_.requests.fetch_add(1, std::memory_order_relaxed);
  if (!opened) return opened.status().with_context("fetch " + name_);
  RangeReader& reader = **opened;
  {
    std::lock_guard lock(context_.mu);
    Result<BlockCache*> cache = context_.cache_for_size_locked(reader.object_size());
    if (!cache) return cache.status();
    cache_ = *cache;
    if (begin_ > cache_->size()) {
      return Status::out_of_range(fmt::format("fetch {}: the object ends at {}", name_,
                                              cache_->size()));
    }
    end_ = std::min(end_, cache_->size());
    next_wake_ = waiters_.empty() ? end_ : waiters_.begin()->first;
  }
  if (reader.range_length() != end_ - begin_) {
    return Status::corruption(fmt::format("fetch {}: the store promised {} bytes, expected {}",
                                          name_, reader.range_length(), end_ - begin_));
  }

  const bool publish_as_we_go = context_.options.strategy == FetchStrategy::kStreaming;
  std::vector<std::byte> batch(kReadBatch);
  uint64_t& position = position_;
  while (position < end_) {
    LB_RETURN_IF_ERROR(io_.check("fetch " + name_));
    // Read up to the next change between cached and uncached blocks, so that
    // a batch is either written whole or skipped whole; and stop at the next
    // waiter's end, so it is woken the moment its bytes are in rather than
    // with the rest of a batch.
    const bool cached = cache_->is_cached(position, position + 1);
    uint64_t stop = cached ? cache_->first_uncached(position, end_)
                           : cache_->first_cached(position, end_);
    if (!cached && next_wake_ > position) stop = std::min(stop, next_wake_);
    Result<size_t> got = reader.read(std::span(batch).first(std::min(kReadBatch, stop - position)));
    if (!got) return got.status().with_context("fetch " + name_);
    if (*got == 0) {
      return Status::corruption(fmt::format("fetch {}: the stream ended after {} of {} bytes",
                                            name_, position - begin_, end_ - begin_));
    }
    // Bytes of blocks cached before this fetch began (after an earlier
    // failure) are dropped: the cache already holds them.
    if (!cached) {
      LB_RETURN_IF_ERROR(cache_->write(position, std::span(batch).first(*got)));
    }
    position += *got;
    context_.bytes.fetch_add(*got, std::memory_order_relaxed);
    if (publish_as_we_go) publish(position);
  }
  // A stream that goes on past what it promised is not serving this range:
  // its bytes cannot be trusted either.
  std::byte extra;
  Result<size_t> more = reader.read(std::span(&extra, 1));
  if (!more) return more.status().with_context("fetch " + name_);
  if (*more != 0) {
    return Status::corruption(
        fmt::format("fetch {}: the stream sent more than the {} bytes promised", name_,
                    end_ - begin_));
  }
  return Status::ok();
}

void FetchSession::publish(uint64_t position) {
  // Blocks below `position` are wholly written, and so is the object's last
  // block once the stream reaches the object's end.
  const uint64_t written =
      position == cache_->size() ? position : align_down(position, cache_->block_size());
  if (written > marked_) {
    cache_->mark_cached(marked_, written);
    marked_ = written;
  }
  std::lock_guard lock(context_.mu);
  wake_satisfied_locked();
  next_wake_ = waiters_.empty() ? end_ : waiters_.begin()->first;
}

void FetchSession::wake_satisfied_locked() {
  bool woke = false;
  while (!waiters_.empty() && waiters_.begin()->first <= marked_) {
    waiters_.begin()->second->woken = true;
    waiters_.erase(waiters_.begin());
    woke = true;
  }
  if (woke) cv_.notify_all();
}

Status FetchSession::wait_for(std::unique_lock<std::mutex>& lock, uint64_t begin, uint64_t end) {
  BlockCache* cache = context_.cache.load(std::memory_order_acquire);
  assert(cache != nullptr);  // callers wait on ranges once the size is known
  bool in_time = true;
  if (!finished_) {
    // The range is complete once the stream has published past the end of
    // its last block.
    const uint64_t due = std::min(align_up(end, cache->block_size()), cache->size());
    Waiter waiter;
    auto it = waiters_.emplace(due, &waiter);
    context_.waiting.fetch_add(1, std::memory_order_relaxed);
    in_time = cv_.wait_until(lock, deadline_, [&] { return waiter.woken || finished_; });
    context_.waiting.fetch_sub(1, std::memory_order_relaxed);
    if (!waiter.woken) waiters_.erase(it);
  }
  if (cache->is_cached(begin, end)) return Status::ok();
  if (finished_) return status_;
  if (!in_time) {
    return Status::timeout(
        fmt::format("fetch {} did not deliver [{}, {}) by its deadline", name_, begin, end));
  }
  return Status::ok();
}

}  // namespace lazyblock
