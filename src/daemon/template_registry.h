// TemplateRegistry: the templates of the daemon, one per (build, name), each
// a Device with its own DataFiles (chunkers and block caches) that every
// device of that template reads through, so that the second VM of a
// template reads what the first one fetched.
//
// Data flow: acquire(build, name) returns a lease on the template, loading
// it first if nobody has: its header is read and its data files' sizes
// learned once, however many callers ask at once (they wait for the one
// load and share its result, an error included). A lease keeps its
// template in use; when the last lease goes, the template is idle and stays
// cached. Eviction (a thread of its own, several times a second, and after
// every load and release) ends idle templates that have been idle for
// longer than the idle TTL, and, while the block caches of all templates
// hold more than the cache budget, idle templates least recently used
// first. Ending a template deletes its cache files (they live in a
// directory of their own under the work dir). A template in use is never
// evicted: the budget may be exceeded while the templates in use need it.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "chunk/chunker.h"
#include "common/io_context.h"
#include "common/mutex.h"
#include "common/status.h"
#include "image/device.h"
#include "storage/object_store.h"

namespace lazyblock::daemon {

struct TemplateOptions {
  std::shared_ptr<ObjectStore> store;
  ChunkerOptions chunker;           // cache_dir is set per template
  std::filesystem::path cache_dir;  // each template's block caches in a directory below
  uint64_t cache_budget = UINT64_MAX;
  std::chrono::nanoseconds idle_ttl = std::chrono::minutes(10);
};

// One shared (build, name): constant after it is loaded.
class Template {
 public:
  Template(image::Uuid build, std::string name, std::filesystem::path cache_dir,
           std::shared_ptr<image::DataFiles> files, std::unique_ptr<image::Device> device);
  // Closes the block caches, then deletes their directory.
  ~Template();

  const image::Uuid& build() const { return build_; }
  const std::string& name() const { return name_; }
  image::Device& device() { return *device_; }
  image::DataFiles& files() { return *files_; }
  // The bytes its block caches hold: what its chunkers have received.
  uint64_t cached_bytes() const;

 private:
  const image::Uuid build_;
  const std::string name_;
  const std::filesystem::path cache_dir_;
  const std::shared_ptr<image::DataFiles> files_;
  const std::unique_ptr<image::Device> device_;
};

class TemplateRegistry;

// A template in use; released when the lease goes.
class TemplateLease {
 public:
  ~TemplateLease();
  TemplateLease(const TemplateLease&) = delete;
  TemplateLease& operator=(const TemplateLease&) = delete;
  Template& get() const { return *template_; }
  Template* operator->() const { return template_.get(); }

 private:
  friend class TemplateRegistry;
  TemplateLease(TemplateRegistry& registry, std::shared_ptr<Template> held)
      : registry_(registry), template_(std::move(held)) {}
  TemplateRegistry& registry_;
  const std::shared_ptr<Template> template_;
};

class TemplateRegistry {
 public:
  explicit TemplateRegistry(TemplateOptions options);
  // Ends the eviction thread and every template. Every lease must be gone.
  ~TemplateRegistry();

  // The template of `name` of `build`, loaded if it is not: kNotFound if the
  // store has no such device (or a data file it maps into).
  Result<std::unique_ptr<TemplateLease>> acquire(const image::Uuid& build, const std::string& name);

  struct Row {
    image::Uuid build;
    std::string name;
    uint64_t size = 0;
    uint64_t cached_bytes = 0;
    uint64_t users = 0;
    double idle_seconds = 0;  // 0 while in use
  };
  // The loaded templates, in (build, name) order.
  std::vector<Row> list() const;

  uint64_t evictions() const;      // templates ended by eviction so far
  uint64_t evicted_bytes() const;  // the cached bytes they held
  uint64_t cache_budget() const { return options_.cache_budget; }

  // Cancels the fetches of every template, loaded or loaded later, for a
  // shutdown that must not wait for a slow store.
  void cancel_all();

 private:
  friend class TemplateLease;
  using Key = std::pair<image::Uuid, std::string>;

  // One load, shared by every caller that asked while it ran.
  struct Load {
    bool done = false;
    Status status;
  };
  struct Entry {
    std::shared_ptr<Load> load;        // while loading
    std::shared_ptr<Template> loaded;  // once loaded
    uint64_t users = 0;
    Clock::time_point last_used;
  };

  Result<std::shared_ptr<Template>> load(const image::Uuid& build, const std::string& name);
  void release(const Key& key);
  // Removes from entries_ what is to be evicted now; the caller ends it
  // outside the lock.
  std::vector<std::shared_ptr<Template>> take_evictable_locked(Clock::time_point now) REQUIRES(mu_);
  void evict_loop();

  const TemplateOptions options_;

  mutable Mutex mu_;
  CondVar changed_;  // a load ended, a lease went, or stopping
  std::map<Key, Entry> entries_ GUARDED_BY(mu_);
  bool cancelled_ GUARDED_BY(mu_) = false;
  bool stopping_ GUARDED_BY(mu_) = false;
  uint64_t evictions_ GUARDED_BY(mu_) = 0;
  uint64_t evicted_bytes_ GUARDED_BY(mu_) = 0;
  std::thread evictor_;  // started last
};

}  // namespace lazyblock::daemon
