#include "daemon/metering_store.h"

namespace lazyblock::daemon {
namespace {

void count_error(StoreMetrics& metrics, const Status& status) {
  metrics.errors[static_cast<size_t>(status.code())].fetch_add(1, std::memory_order_relaxed);
}

class MeteringReader : public RangeReader {
 public:
  MeteringReader(std::unique_ptr<RangeReader> inner, StoreMetrics& metrics,
                 Clock::time_point opened)
      : inner_(std::move(inner)), metrics_(metrics), opened_(opened) {}

  Result<size_t> read(std::span<std::byte> buffer) override {
    Result<size_t> got = inner_->read(buffer);
    if (!got) {
      count_error(metrics_, got.status());
      return got;
    }
    if (*got > 0) {
      if (!first_byte_seen_) {
        first_byte_seen_ = true;
        metrics_.first_byte.observe(Clock::now() - opened_);
      }
      metrics_.bytes.fetch_add(*got, std::memory_order_relaxed);
    }
    return got;
  }
  uint64_t object_size() const override { return inner_->object_size(); }
  std::string object_version() const override { return inner_->object_version(); }
  uint64_t range_length() const override { return inner_->range_length(); }

 private:
  const std::unique_ptr<RangeReader> inner_;
  StoreMetrics& metrics_;
  const Clock::time_point opened_;
  bool first_byte_seen_ = false;
};

}  // namespace

Result<ObjectInfo> MeteringStore::stat_info(const std::string& key, const IoContext& io) {
  metrics_.stat_requests.fetch_add(1, std::memory_order_relaxed);
  Result<ObjectInfo> info = StoreLayer::stat_info(key, with_stop(io));
  if (!info) count_error(metrics_, info.status());
  return info;
}

Result<std::unique_ptr<RangeReader>> MeteringStore::open_range(const std::string& key,
                                                               uint64_t offset, uint64_t length,
                                                               const IoContext& io) {
  metrics_.range_requests.fetch_add(1, std::memory_order_relaxed);
  const Clock::time_point opened = Clock::now();
  Result<std::unique_ptr<RangeReader>> reader =
      StoreLayer::open_range(key, offset, length, with_stop(io));
  if (!reader) {
    count_error(metrics_, reader.status());
    return reader.status();
  }
  return std::unique_ptr<RangeReader>(
      new MeteringReader(std::move(reader).value(), metrics_, opened));
}

}  // namespace lazyblock::daemon
