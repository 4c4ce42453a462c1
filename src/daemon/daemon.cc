#include "daemon/daemon.h"

#include <thread>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/log.h"
#include "daemon/device_servers.h"
#include "daemon/device_specs.h"
#include "serve/nbd/nbd_server.h"
#include "serve/uffd/uffd_server.h"

namespace lazyblock::daemon {
namespace {

using nlohmann::json;

// The worker threads of all disks (NBD requests) and of all memory devices
// (faults that wait on fetches): requests that wait on a fetch hold one, so
// the pools are large enough to keep many fetches in flight for a host's
// VMs, and fixed, so that the daemon's threads do not grow with its devices.
constexpr int kDiskWorkers = 32;
constexpr int kMemoryWorkers = 32;

int http_status(StatusCode code) {
  switch (code) {
    case StatusCode::kInvalidArgument:
      return 400;
    case StatusCode::kNotFound:
      return 404;
    case StatusCode::kAlreadyExists:
      return 409;
    default:
      return 500;
  }
}

HttpResponse fault(int status, const std::string& message) {
  return {status, "application/json", json{{"fault_message", message}}.dump() + "\n"};
}

HttpResponse fault(const Status& status) {
  return fault(http_status(status.code()), status.message());
}

HttpResponse reply(int status, const json& body) {
  return {status, "application/json", body.dump() + "\n"};
}

std::string disk_uri(const DiskSpec& spec) {
  return fmt::format("nbd+unix:///{}?socket={}", spec.name, spec.socket.string());
}

}  // namespace

struct Daemon::Disk {
  DiskSpec spec;
  std::unique_ptr<TemplateLease> lease;
  std::unique_ptr<DiskServer> served;  // its overlay, metered export and server
  std::thread serving;
};

struct Daemon::Memory {
  MemorySpec spec;
  std::unique_ptr<TemplateLease> lease;
  std::unique_ptr<uffd::UffdServer> server;
  std::thread serving;
  uint64_t prefetch_bytes = 0;
};

Daemon::Daemon(DaemonOptions options, StoreMetrics& store_metrics)
    : options_(std::move(options)),
      store_metrics_(store_metrics),
      started_(std::chrono::steady_clock::now()),
      disk_workers_(kDiskWorkers),
      memory_workers_(kMemoryWorkers),
      templates_(options_.templates) {}

Daemon::~Daemon() { shutdown(); }

HttpResponse Daemon::handle(const HttpRequest& request) {
  if (request.body_too_large) {
    return fault(400, fmt::format("the body is larger than {} bytes", kMaxBody));
  }
  const std::string& path = request.path;
  const std::string& method = request.method;
  auto only = [&](const char* allowed) {
    return fault(400, fmt::format("{} is not allowed on {} (only {})", method, path, allowed));
  };
  if (path == "/") return method == "GET" ? about() : only("GET");
  if (path == "/metrics") {
    if (method != "GET") return only("GET");
    return {200, "text/plain; version=0.0.4; charset=utf-8", metrics_text()};
  }
  if (path == "/templates") return method == "GET" ? list_templates() : only("GET");
  if (path == "/disks") return method == "GET" ? list_disks() : only("GET");
  if (path == "/memory") return method == "GET" ? list_memory() : only("GET");
  for (const std::string_view collection : {"/disks/", "/memory/"}) {
    if (!path.starts_with(collection)) continue;
    const std::string id = path.substr(collection.size());
    if (Status s = check_device_id(id); !s.is_ok()) return fault(s);
    const bool disk = collection == "/disks/";
    if (method == "PUT") return disk ? put_disk(id, request.body) : put_memory(id, request.body);
    if (method == "DELETE") return disk ? delete_disk(id) : delete_memory(id);
    return only("PUT, DELETE");
  }
  return fault(404, fmt::format("no such resource: {}", path));
}

HttpResponse Daemon::put_disk(const std::string& id, const std::string& body) {
  Result<DiskSpec> spec = parse_disk_spec(body);
  if (!spec) return fault(spec.status().with_context("PUT /disks/" + id));
  {
    MutexLock lock(mu_);
    if (shut_down_) return fault(500, "the daemon is shutting down");
    if (disks_.contains(id)) return fault(409, fmt::format("disk '{}' exists already", id));
    disks_[id] = nullptr;  // the id is taken while the disk is made
  }
  auto made = [&]() -> Result<std::unique_ptr<Disk>> {
    auto disk = std::make_unique<Disk>();
    disk->spec = *spec;
    Result<std::unique_ptr<TemplateLease>> lease = templates_.acquire(spec->build, spec->name);
    if (!lease) return lease.status();
    disk->lease = std::move(lease).value();
    DiskServerOptions served;
    served.name = spec->name;
    served.read_only = spec->read_only;
    served.overlay = spec->overlay;
    served.temp_dir = options_.work_dir;
    served.workers = &disk_workers_;
    served.observer = &serve_metrics_;
    served.reads = &serve_metrics_;
    Result<std::unique_ptr<DiskServer>> opened = DiskServer::open((*disk->lease)->device(), served);
    if (!opened) return opened.status();
    disk->served = std::move(opened).value();
    LB_RETURN_IF_ERROR(disk->served->server().listen_unix(spec->socket));
    return disk;
  }();
  MutexLock lock(mu_);
  if (!made) {
    disks_.erase(id);
    return fault(made.status().with_context("PUT /disks/" + id));
  }
  Disk& disk = **made;
  disk.serving = std::thread([&disk, id] {
    if (Status s = disk.served->server().serve(); !s.is_ok()) {
      log(LogLevel::kError, "daemon: disk {}: {}", id, s.message());
    }
  });
  const uint64_t size = disk.lease->get().device().size();
  disks_[id] = std::move(made).value();
  log(LogLevel::kInfo, "daemon: disk {} serves {}/{} at {}", id, spec->build.to_string(),
      spec->name, spec->socket.string());
  return reply(201, {{"id", id}, {"uri", disk_uri(*spec)}, {"size", size}});
}

HttpResponse Daemon::put_memory(const std::string& id, const std::string& body) {
  Result<MemorySpec> spec = parse_memory_spec(body);
  if (!spec) return fault(spec.status().with_context("PUT /memory/" + id));
  {
    MutexLock lock(mu_);
    if (shut_down_) return fault(500, "the daemon is shutting down");
    if (memory_.contains(id)) return fault(409, fmt::format("memory '{}' exists already", id));
    memory_[id] = nullptr;
  }
  auto made = [&]() -> Result<std::unique_ptr<Memory>> {
    auto memory = std::make_unique<Memory>();
    memory->spec = *spec;
    Result<std::unique_ptr<TemplateLease>> lease = templates_.acquire(spec->build, spec->name);
    if (!lease) return lease.status();
    memory->lease = std::move(lease).value();
    uffd::UffdOptions options;
    if (spec->record) options.record = *spec->record;
    options.shared_workers = &memory_workers_;
    if (spec->prefetch) {
      Template& shared = memory->lease->get();
      Result<std::vector<uffd::PageRun>> plan =
          stored_prefetch_plan(shared.files().store(), shared.build(), shared.name(),
                               shared.files().options().fetch_timeout);
      if (!plan) return plan.status();
      for (const uffd::PageRun& run : *plan) memory->prefetch_bytes += run.length;
      options.prefetch = std::move(plan).value();
    }
    memory->server =
        std::make_unique<uffd::UffdServer>((*memory->lease)->device(), std::move(options));
    memory->server->set_observer(&serve_metrics_);
    LB_RETURN_IF_ERROR(memory->server->listen_unix(spec->socket));
    return memory;
  }();
  MutexLock lock(mu_);
  if (!made) {
    memory_.erase(id);
    return fault(made.status().with_context("PUT /memory/" + id));
  }
  Memory& memory = **made;
  memory.serving = std::thread([&memory, id] {
    if (Status s = memory.server->serve(); !s.is_ok()) {
      log(LogLevel::kError, "daemon: memory {}: {}", id, s.message());
    }
  });
  const uint64_t size = memory.lease->get().device().size();
  const uint64_t prefetch_bytes = memory.prefetch_bytes;
  memory_[id] = std::move(made).value();
  log(LogLevel::kInfo, "daemon: memory {} serves {}/{} at {}", id, spec->build.to_string(),
      spec->name, spec->socket.string());
  return reply(201, {{"id", id},
                     {"socket", spec->socket.string()},
                     {"size", size},
                     {"prefetch_bytes", prefetch_bytes}});
}

Status Daemon::end_disk(Disk& disk) {
  disk.served->server().stop();
  disk.serving.join();
  ended_nbd_connections_ += disk.served->server().connections();
  const Status flushed = disk.served->retire();
  disk.served.reset();
  disk.lease.reset();
  return flushed;
}

void Daemon::end_memory(Memory& memory) {
  memory.server->stop();
  memory.serving.join();
  const uffd::UffdStats stats = memory.server->stats();
  ended_uffd_connections_ += stats.connections;
  ended_prefetched_ += stats.prefetched;
  memory.server.reset();  // writes the sessions' records
  memory.lease.reset();
}

HttpResponse Daemon::delete_disk(const std::string& id) {
  std::unique_ptr<Disk> disk;
  {
    MutexLock lock(mu_);
    const auto found = disks_.find(id);
    if (found == disks_.end()) return fault(404, fmt::format("no disk '{}'", id));
    if (!found->second) return fault(409, fmt::format("disk '{}' is being made", id));
    disk = std::move(found->second);
    disks_.erase(found);
  }
  if (Status s = end_disk(*disk); !s.is_ok()) {
    return fault(s.with_context(fmt::format("DELETE /disks/{}: flushing its overlay", id)));
  }
  log(LogLevel::kInfo, "daemon: disk {} ended", id);
  return {204, "application/json", ""};
}

HttpResponse Daemon::delete_memory(const std::string& id) {
  std::unique_ptr<Memory> memory;
  {
    MutexLock lock(mu_);
    const auto found = memory_.find(id);
    if (found == memory_.end()) return fault(404, fmt::format("no memory '{}'", id));
    if (!found->second) return fault(409, fmt::format("memory '{}' is being made", id));
    memory = std::move(found->second);
    memory_.erase(found);
  }
  end_memory(*memory);
  log(LogLevel::kInfo, "daemon: memory {} ended", id);
  return {204, "application/json", ""};
}

HttpResponse Daemon::list_disks() {
  json rows = json::array();
  MutexLock lock(mu_);
  for (const auto& [id, disk] : disks_) {
    if (!disk) continue;
    json row = {{"id", id},
                {"build", disk->spec.build.to_string()},
                {"name", disk->spec.name},
                {"uri", disk_uri(disk->spec)},
                {"size", disk->lease->get().device().size()},
                {"read_only", disk->spec.read_only},
                {"connections", disk->served->server().connections()},
                {"requests", disk->served->server().requests()},
                {"reads_cached", disk->served->metered()->reads_cached()},
                {"reads_waited", disk->served->metered()->reads_waited()}};
    if (disk->spec.overlay) row["overlay"] = disk->spec.overlay->string();
    rows.push_back(std::move(row));
  }
  return reply(200, rows);
}

HttpResponse Daemon::list_memory() {
  json rows = json::array();
  MutexLock lock(mu_);
  for (const auto& [id, memory] : memory_) {
    if (!memory) continue;
    const uffd::UffdStats stats = memory->server->stats();
    json row = {{"id", id},
                {"build", memory->spec.build.to_string()},
                {"name", memory->spec.name},
                {"socket", memory->spec.socket.string()},
                {"size", memory->lease->get().device().size()},
                {"prefetch_bytes", memory->prefetch_bytes},
                {"connections", stats.connections},
                {"faults", stats.faults},
                {"served_cached", stats.served_cached},
                {"served_fetched", stats.served_fetched},
                {"served_zero", stats.served_zero},
                {"prefetched", stats.prefetched}};
    if (memory->spec.record) row["record"] = memory->spec.record->string();
    rows.push_back(std::move(row));
  }
  return reply(200, rows);
}

HttpResponse Daemon::list_templates() {
  json rows = json::array();
  for (const TemplateRegistry::Row& row : templates_.list()) {
    rows.push_back({{"build", row.build.to_string()},
                    {"name", row.name},
                    {"size", row.size},
                    {"cached_bytes", row.cached_bytes},
                    {"users", row.users},
                    {"idle_seconds", row.idle_seconds}});
  }
  return reply(200, rows);
}

HttpResponse Daemon::about() {
  const double uptime =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  size_t disks = 0;
  size_t memory = 0;
  {
    MutexLock lock(mu_);
    disks = disks_.size();
    memory = memory_.size();
  }
  return reply(200, {{"version", options_.version},
                     {"uptime_seconds", uptime},
                     {"disks", disks},
                     {"memory", memory},
                     {"templates", templates_.list().size()}});
}

void Daemon::shutdown() {
  std::map<std::string, std::unique_ptr<Disk>> disks;
  std::map<std::string, std::unique_ptr<Memory>> memory;
  {
    MutexLock lock(mu_);
    if (shut_down_) return;
    shut_down_ = true;
    disks.swap(disks_);
    memory.swap(memory_);
  }
  // Requests waiting on fetches end now (ESHUTDOWN, a retried fault)
  // instead of waiting for a slow store.
  templates_.cancel_all();
  for (auto& [id, disk] : disks) {
    if (!disk) continue;
    if (Status s = end_disk(*disk); !s.is_ok()) {
      log(LogLevel::kError, "daemon: disk {}: flushing its overlay: {}", id, s.message());
    }
  }
  for (auto& [id, one] : memory) {
    if (one) end_memory(*one);
  }
}

void Daemon::cancel_fetches() { templates_.cancel_all(); }

std::string Daemon::metrics_text() {
  MetricsText out;
  out.family("lazyblock_store_requests_total", "counter",
             "Calls to the store, by operation (range: a range stream opened; stat: a size "
             "asked)");
  out.sample("lazyblock_store_requests_total", {{"op", "range"}},
             static_cast<double>(store_metrics_.range_requests.load()));
  out.sample("lazyblock_store_requests_total", {{"op", "stat"}},
             static_cast<double>(store_metrics_.stat_requests.load()));
  out.family("lazyblock_store_received_bytes_total", "counter",
             "Bytes received from the store's range streams");
  out.sample("lazyblock_store_received_bytes_total", {},
             static_cast<double>(store_metrics_.bytes.load()));
  out.family("lazyblock_store_errors_total", "counter",
             "Store calls and stream reads that failed, by kind");
  for (size_t code = 1; code < kStatusCodes; ++code) {
    out.sample("lazyblock_store_errors_total",
               {{"kind", std::string(status_label(static_cast<StatusCode>(code)))}},
               static_cast<double>(store_metrics_.errors[code].load()));
  }
  out.family("lazyblock_store_first_byte_seconds", "histogram",
             "Time from opening a range stream to its first byte");
  out.histogram("lazyblock_store_first_byte_seconds", {}, store_metrics_.first_byte.snapshot());

  const std::vector<TemplateRegistry::Row> rows = templates_.list();
  uint64_t cached = 0;
  uint64_t in_use = 0;
  for (const TemplateRegistry::Row& row : rows) {
    cached += row.cached_bytes;
    if (row.users > 0) ++in_use;
  }
  out.family("lazyblock_cache_bytes", "gauge", "Bytes held by the templates' block caches");
  out.sample("lazyblock_cache_bytes", {}, static_cast<double>(cached));
  out.family("lazyblock_cache_budget_bytes", "gauge",
             "The bound of the block caches (--cache-budget)");
  out.sample("lazyblock_cache_budget_bytes", {}, static_cast<double>(templates_.cache_budget()));
  out.family("lazyblock_cache_evictions_total", "counter", "Idle templates evicted");
  out.sample("lazyblock_cache_evictions_total", {}, static_cast<double>(templates_.evictions()));
  out.family("lazyblock_cache_evicted_bytes_total", "counter",
             "Bytes of block caches deleted by evictions");
  out.sample("lazyblock_cache_evicted_bytes_total", {},
             static_cast<double>(templates_.evicted_bytes()));

  uint64_t nbd_connections = ended_nbd_connections_.load();
  uint64_t uffd_connections = ended_uffd_connections_.load();
  uint64_t prefetched = ended_prefetched_.load();
  size_t disks = 0;
  size_t memories = 0;
  {
    MutexLock lock(mu_);
    for (const auto& [id, disk] : disks_) {
      if (!disk) continue;
      ++disks;
      nbd_connections += disk->served->server().connections();
    }
    for (const auto& [id, memory] : memory_) {
      if (!memory) continue;
      ++memories;
      const uffd::UffdStats stats = memory->server->stats();
      uffd_connections += stats.connections;
      prefetched += stats.prefetched;
    }
  }
  out.family("lazyblock_nbd_connections_total", "counter", "NBD connections accepted");
  out.sample("lazyblock_nbd_connections_total", {}, static_cast<double>(nbd_connections));
  out.family("lazyblock_uffd_connections_total", "counter", "VMs connected to a UFFD handler");
  out.sample("lazyblock_uffd_connections_total", {}, static_cast<double>(uffd_connections));
  out.family("lazyblock_uffd_prefetched_pages_total", "counter",
             "Pages installed by prefetch ahead of a fault");
  out.sample("lazyblock_uffd_prefetched_pages_total", {}, static_cast<double>(prefetched));
  serve_metrics_.render(out);
  out.family("lazyblock_devices", "gauge", "Devices served, by kind");
  out.sample("lazyblock_devices", {{"kind", "disk"}}, static_cast<double>(disks));
  out.sample("lazyblock_devices", {{"kind", "memory"}}, static_cast<double>(memories));
  out.family("lazyblock_templates", "gauge", "Templates loaded, by state");
  out.sample("lazyblock_templates", {{"state", "in_use"}}, static_cast<double>(in_use));
  out.sample("lazyblock_templates", {{"state", "idle"}}, static_cast<double>(rows.size() - in_use));
  return out.text();
}

}  // namespace lazyblock::daemon
