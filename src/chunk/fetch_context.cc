#include "chunk/fetch_context.h"

#include <cstdlib>

#include <fmt/format.h>

namespace lazyblock {
namespace {

// Weight of the newest observation in the estimates: recent enough to follow
// a store that slows down, steady enough that one odd stream does not swing
// the plan.
constexpr double kEstimateWeight = 0.25;

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

void FetchContext::observe_ttfb_locked(double seconds) {
  estimate.ttfb_seconds += kEstimateWeight * (seconds - estimate.ttfb_seconds);
}

void FetchContext::observe_bandwidth_locked(double bytes_per_second) {
  estimate.bytes_per_second += kEstimateWeight * (bytes_per_second - estimate.bytes_per_second);
}

}  // namespace lazyblock
