#include "storage/fault_store.h"

#include <algorithm>
#include <vector>

#include <fmt/format.h>

#include "common/units.h"

namespace lazyblock {

class FaultStore::Reader final : public RangeReader {
 public:
  Reader(FaultStore& store, std::unique_ptr<RangeReader> inner, FaultSpec spec, uint64_t offset,
         uint64_t object_size, uint64_t range_length, IoContext io, std::string key)
      : store_(store),
        inner_(std::move(inner)),
        spec_(std::move(spec)),
        offset_(offset),
        object_size_(object_size),
        range_length_(range_length),
        io_(std::move(io)),
        key_(std::move(key)) {}

  Result<size_t> read(std::span<std::byte> buffer) override {
    uint64_t limit = buffer.size();
    if (spec_.fail_after) {
      if (delivered_ >= *spec_.fail_after) {
        return Status::unavailable(
            fmt::format("injected fault: stream of {} failed after {} bytes", key_, delivered_));
      }
      limit = std::min(limit, *spec_.fail_after - delivered_);
    }
    if (spec_.stall_after && !stall_passed_) {
      if (delivered_ >= *spec_.stall_after) {
        LB_RETURN_IF_ERROR(store_.stall(io_, key_));
        stall_passed_ = true;
      } else {
        limit = std::min(limit, *spec_.stall_after - delivered_);
      }
    }
    if (spec_.short_object) {
      const uint64_t position = offset_ + delivered_;
      if (position >= *spec_.short_object) return size_t{0};  // the body ends here
      limit = std::min(limit, *spec_.short_object - position);
    }
    Result<size_t> got = inner_->read(buffer.first(limit));
    if (got) delivered_ += *got;
    return got;
  }
  uint64_t object_size() const override { return object_size_; }
  std::string object_version() const override { return inner_->object_version(); }
  uint64_t range_length() const override { return range_length_; }

 private:
  FaultStore& store_;
  const std::unique_ptr<RangeReader> inner_;
  const FaultSpec spec_;
  const uint64_t offset_;
  const uint64_t object_size_;
  const uint64_t range_length_;
  const IoContext io_;
  const std::string key_;
  uint64_t delivered_ = 0;
  bool stall_passed_ = false;
};

Result<FaultSpec> FaultSpec::parse(std::string_view text) {
  FaultSpec spec;
  if (text.empty() || text == "none") return spec;
  size_t start = 0;
  while (start <= text.size()) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string_view item = text.substr(start, comma - start);
    start = comma + 1;
    const size_t equals = item.find('=');
    const std::string_view name = item.substr(0, equals);
    if (name == "fail-open" && equals == std::string_view::npos) {
      spec.fail_open = true;
      continue;
    }
    std::optional<uint64_t>* field = nullptr;
    if (name == "fail-after") field = &spec.fail_after;
    if (name == "stall-after") field = &spec.stall_after;
    if (name == "short") field = &spec.short_object;
    if (name == "size") field = &spec.reported_size;
    if (name == "times") field = &spec.times;
    if (field == nullptr || equals == std::string_view::npos) {
      return Status::invalid_argument(fmt::format(
          "invalid fault '{}' (expected fail-open, fail-after=N, stall-after=N, short=N, "
          "size=N or times=N)",
          item));
    }
    Result<uint64_t> value = parse_size(item.substr(equals + 1));
    if (!value) {
      return Status::invalid_argument(
          fmt::format("invalid fault '{}': {}", item, value.status().message()));
    }
    *field = *value;
  }
  return spec;
}

std::string FaultSpec::to_string() const {
  std::vector<std::string> items;
  if (fail_open) items.push_back("fail-open");
  if (fail_after) items.push_back(fmt::format("fail-after={}", *fail_after));
  if (stall_after) items.push_back(fmt::format("stall-after={}", *stall_after));
  if (short_object) items.push_back(fmt::format("short={}", *short_object));
  if (reported_size) items.push_back(fmt::format("size={}", *reported_size));
  if (times) items.push_back(fmt::format("times={}", *times));
  return items.empty() ? "none" : fmt::format("{}", fmt::join(items, ","));
}

FaultStore::FaultStore(std::shared_ptr<ObjectStore> inner, FaultSpec spec)
    : StoreLayer(std::move(inner)), spec_(std::move(spec)) {}

void FaultStore::set(FaultSpec spec) {
  MutexLock lock(mu_);
  spec_ = std::move(spec);
  faulted_calls_ = 0;
}

FaultSpec FaultStore::spec_for_call() {
  MutexLock lock(mu_);
  if (spec_.times && faulted_calls_ >= *spec_.times) return FaultSpec{};
  ++faulted_calls_;
  return spec_;
}

void FaultStore::release_stalls() {
  MutexLock lock(mu_);
  stalls_released_ = true;
  cv_.notify_all();
}

void FaultStore::wait_for_stalls(int count) {
  MutexLock lock(mu_);
  cv_.wait(lock, [&]() REQUIRES(mu_) { return stalls_reached_ >= count; });
}

int FaultStore::opens() const {
  MutexLock lock(mu_);
  return opens_;
}

Status FaultStore::stall(const IoContext& io, const std::string& key) {
  MutexLock lock(mu_);
  ++stalls_reached_;
  cv_.notify_all();
  const std::string what = "read " + key + " (injected stall)";
  const auto released = [&]() REQUIRES(mu_) { return stalls_released_; };
  if (io.deadline == Clock::time_point::max()) {
    cv_.wait(lock, io.stop, released);
  } else {
    cv_.wait_until(lock, io.stop, io.deadline, released);
  }
  if (stalls_released_) return Status::ok();
  return io.check(what);
}

Result<ObjectInfo> FaultStore::stat_info(const std::string& key, const IoContext& io) {
  const FaultSpec spec = spec_for_call();
  if (spec.fail_open) return Status::unavailable("injected fault: stat " + key);
  Result<ObjectInfo> info = StoreLayer::stat_info(key, io);
  if (info && spec.reported_size) info->size = *spec.reported_size;
  return info;
}

Result<std::unique_ptr<RangeReader>> FaultStore::open_range(const std::string& key, uint64_t offset,
                                                            uint64_t length, const IoContext& io) {
  const FaultSpec spec = spec_for_call();
  {
    MutexLock lock(mu_);
    ++opens_;
  }
  if (spec.fail_open) {
    return Status::unavailable(fmt::format("injected fault: open {} at {}", key, offset));
  }
  Result<std::unique_ptr<RangeReader>> inner = StoreLayer::open_range(key, offset, length, io);
  if (!inner) return inner.status();
  const uint64_t object_size = spec.reported_size.value_or((*inner)->object_size());
  // The range the store promises, computed from the size it reports.
  const uint64_t range_length = offset >= object_size ? 0 : std::min(length, object_size - offset);
  return std::unique_ptr<RangeReader>(new Reader(*this, std::move(inner).value(), spec, offset,
                                                 object_size, range_length, io, key));
}

std::string FaultStore::describe() const {
  MutexLock lock(mu_);
  return fmt::format("faults({}) over {}", spec_.to_string(), StoreLayer::describe());
}

}  // namespace lazyblock
