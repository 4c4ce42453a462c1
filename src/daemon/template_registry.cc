#include "daemon/template_registry.h"

#include <algorithm>
#include <atomic>
#include <system_error>

#include <fmt/format.h>

#include "common/log.h"
#include "daemon/device_servers.h"

namespace lazyblock::daemon {
namespace {

// How often idle templates are looked at while nothing else wakes the
// eviction thread: caches of templates in use grow between loads and
// releases.
constexpr std::chrono::milliseconds kEvictionTick{200};

}  // namespace

Template::Template(image::Uuid build, std::string name, std::filesystem::path cache_dir,
                   std::shared_ptr<image::DataFiles> files, std::unique_ptr<image::Device> device)
    : build_(build),
      name_(std::move(name)),
      cache_dir_(std::move(cache_dir)),
      files_(std::move(files)),
      device_(std::move(device)) {}

Template::~Template() {
  // The caches are unnamed files in cache_dir_: closing them frees them.
  // The directory is ours (made for this template alone).
  std::error_code ignored;  // a directory left behind costs nothing but a name
  std::filesystem::remove_all(cache_dir_, ignored);
}

uint64_t Template::cached_bytes() const {
  uint64_t bytes = 0;
  for (const auto& [build, stats] : files_->stats()) bytes += stats.bytes;
  return bytes;
}

TemplateLease::~TemplateLease() { registry_.release({template_->build(), template_->name()}); }

TemplateRegistry::TemplateRegistry(TemplateOptions options)
    : options_(std::move(options)), evictor_([this] { evict_loop(); }) {}

TemplateRegistry::~TemplateRegistry() {
  {
    MutexLock lock(mu_);
    stopping_ = true;
  }
  changed_.notify_all();
  evictor_.join();
}

Result<std::shared_ptr<Template>> TemplateRegistry::load(const image::Uuid& build,
                                                         const std::string& name) {
  static std::atomic<uint64_t> loads{0};
  const std::filesystem::path dir =
      options_.cache_dir / fmt::format("{}-{}-{}", build.to_string(), name, ++loads);
  std::error_code error;
  std::filesystem::create_directories(dir, error);
  if (error) {
    return Status::io_error(fmt::format("cannot make {}: {}", dir.string(), error.message()));
  }
  ChunkerOptions chunker = options_.chunker;
  chunker.cache_dir = dir;
  Result<OpenedDevice> opened = open_device(options_.store, chunker, build, name);
  if (!opened) {
    std::filesystem::remove_all(dir, error);
    return opened.status();
  }
  return std::make_shared<Template>(build, name, dir, std::move(opened->files),
                                    std::move(opened->device));
}

Result<std::unique_ptr<TemplateLease>> TemplateRegistry::acquire(const image::Uuid& build,
                                                                 const std::string& name) {
  const Key key{build, name};
  MutexLock lock(mu_);
  for (;;) {
    if (stopping_ || cancelled_) return Status::cancelled("the daemon is shutting down");
    const auto found = entries_.find(key);
    if (found == entries_.end()) break;
    if (found->second.loaded) {
      ++found->second.users;
      return std::unique_ptr<TemplateLease>(new TemplateLease(*this, found->second.loaded));
    }
    // Someone loads it: wait for that load and share its end (then take it
    // as anyone would: it may have been evicted since, and is loaded again).
    const std::shared_ptr<Load> load = found->second.load;
    changed_.wait(lock, [&] { return load->done; });
    if (!load->status.is_ok()) return load->status;
  }
  Entry& entry = entries_[key];
  const auto load = std::make_shared<Load>();
  entry.load = load;
  lock.unlock();
  Result<std::shared_ptr<Template>> loaded = this->load(build, name);
  lock.lock();
  Entry& now = entries_.at(key);  // an entry that loads is never evicted
  now.load.reset();
  load->done = true;
  if (!loaded) {
    load->status = loaded.status();
    entries_.erase(key);
    changed_.notify_all();
    return loaded.status();
  }
  if (cancelled_) (*loaded)->files().cancel();
  now.loaded = *loaded;
  ++now.users;  // ours; those who waited take theirs as they wake
  now.last_used = Clock::now();
  changed_.notify_all();
  return std::unique_ptr<TemplateLease>(new TemplateLease(*this, *loaded));
}

void TemplateRegistry::release(const Key& key) {
  {
    MutexLock lock(mu_);
    Entry& entry = entries_.at(key);
    --entry.users;
    entry.last_used = Clock::now();
  }
  changed_.notify_all();
}

std::vector<TemplateRegistry::Row> TemplateRegistry::list() const {
  std::vector<Row> rows;
  MutexLock lock(mu_);
  const Clock::time_point now = Clock::now();
  for (const auto& [key, entry] : entries_) {
    if (!entry.loaded) continue;
    Row row{key.first,   key.second, entry.loaded->device().size(), entry.loaded->cached_bytes(),
            entry.users, 0};
    if (entry.users == 0) {
      row.idle_seconds = std::chrono::duration<double>(now - entry.last_used).count();
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

uint64_t TemplateRegistry::evictions() const {
  MutexLock lock(mu_);
  return evictions_;
}

uint64_t TemplateRegistry::evicted_bytes() const {
  MutexLock lock(mu_);
  return evicted_bytes_;
}

void TemplateRegistry::cancel_all() {
  MutexLock lock(mu_);
  cancelled_ = true;
  for (auto& [key, entry] : entries_) {
    if (entry.loaded) entry.loaded->files().cancel();
  }
}

std::vector<std::shared_ptr<Template>> TemplateRegistry::take_evictable_locked(
    Clock::time_point now) {
  std::vector<std::shared_ptr<Template>> evicted;
  auto evict = [&](std::map<Key, Entry>::iterator it, const char* why, uint64_t bytes)
                   REQUIRES(mu_) {
                     log(LogLevel::kInfo, "daemon: evicting template {}/{} ({}, {} cached)",
                         it->first.first.to_string(), it->first.second, why, bytes);
                     ++evictions_;
                     evicted_bytes_ += bytes;
                     evicted.push_back(std::move(it->second.loaded));
                     entries_.erase(it);
                   };
  // Idle for longer than the TTL.
  for (auto it = entries_.begin(); it != entries_.end();) {
    const auto next = std::next(it);
    const Entry& entry = it->second;
    if (entry.loaded && entry.users == 0 && now - entry.last_used >= options_.idle_ttl) {
      evict(it, "idle for longer than --idle-ttl", entry.loaded->cached_bytes());
    }
    it = next;
  }
  // Over budget: the least recently used idle ones.
  uint64_t total = 0;
  for (const auto& [key, entry] : entries_) {
    if (entry.loaded) total += entry.loaded->cached_bytes();
  }
  while (total > options_.cache_budget) {
    auto oldest = entries_.end();
    for (auto it = entries_.begin(); it != entries_.end(); ++it) {
      if (!it->second.loaded || it->second.users > 0) continue;
      if (oldest == entries_.end() || it->second.last_used < oldest->second.last_used) oldest = it;
    }
    if (oldest == entries_.end()) break;  // every template with a cache is in use
    const uint64_t bytes = oldest->second.loaded->cached_bytes();
    evict(oldest, "over --cache-budget", bytes);
    total -= std::min(total, bytes);
  }
  return evicted;
}

void TemplateRegistry::evict_loop() {
  MutexLock lock(mu_);
  while (!stopping_) {
    std::vector<std::shared_ptr<Template>> evicted = take_evictable_locked(Clock::now());
    if (!evicted.empty()) {
      lock.unlock();
      evicted.clear();  // closes their caches and deletes their files, outside the lock
      lock.lock();
      continue;
    }
    changed_.wait_for(lock, kEvictionTick);
  }
}

}  // namespace lazyblock::daemon
