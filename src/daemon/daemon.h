// Daemon: the host service behind `lazyblock daemon`. It keeps the devices
// (disks over NBD, guest memory over UFFD) an orchestrator asked for through
// the API, each on its own socket, all reading through the shared templates
// of a TemplateRegistry, and answers the API's requests.
//
// Data flow: HttpServer -> Daemon::handle(request) -> route -> (PUT) check
// the body (device_specs.h), reserve the id, lease the template, open the
// device's server and its socket, start serving it on a thread of its own
// -> 201; (DELETE) take the device out, stop its server (its clients are
// disconnected), flush its overlay, release the lease -> 204; (GET) a JSON
// view, or /metrics in Prometheus text. A request that fails changes
// nothing: a device half made is undone before the answer.
//
// Each disk has its own Overlay (temporary in the work dir, or kept where
// the request said) over the template's Device, so VMs never see each
// other's writes. Errors are {"fault_message": "..."} with 400 (malformed
// request), 404 (no such device, build or name), 409 (the id exists, the
// socket is in use), 500 (anything else).
#pragma once

#include <atomic>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "common/mutex.h"
#include "common/worker_pool.h"
#include "daemon/http_server.h"
#include "daemon/metering_store.h"
#include "daemon/serve_metrics.h"
#include "daemon/template_registry.h"

namespace lazyblock::daemon {

struct DaemonOptions {
  TemplateOptions templates;       // its store is metered into `store_metrics`
  std::filesystem::path work_dir;  // temporary overlays live here
  std::string version;             // for GET /
};

class Daemon {
 public:
  // `store_metrics` is what the templates' store (a MeteringStore) counts.
  Daemon(DaemonOptions options, StoreMetrics& store_metrics);
  // shutdown(), if not yet.
  ~Daemon();

  HttpResponse handle(const HttpRequest& request);

  // Ends every device cleanly: fetches in flight cancelled, servers
  // stopped, overlays flushed (kept ones stay), sockets removed. New PUTs
  // are refused from the call on. Idempotent.
  void shutdown();

  // Cancels every template's fetches, and refuses new template loads, for
  // a shutdown: calls in progress that wait on them end now. Call before
  // the API server stops, then shutdown().
  void cancel_fetches();

  // GET /metrics.
  std::string metrics_text();

 private:
  struct Disk;
  struct Memory;

  HttpResponse put_disk(const std::string& id, const std::string& body);
  HttpResponse put_memory(const std::string& id, const std::string& body);
  HttpResponse delete_disk(const std::string& id);
  HttpResponse delete_memory(const std::string& id);
  HttpResponse list_disks();
  HttpResponse list_memory();
  HttpResponse list_templates();
  HttpResponse about();
  // Stops a device's server, waits for its thread, flushes its overlay.
  Status end_disk(Disk& disk);
  void end_memory(Memory& memory);

  const DaemonOptions options_;
  StoreMetrics& store_metrics_;
  const std::chrono::steady_clock::time_point started_;
  ServeMetrics serve_metrics_;  // every device's server reports here
  // Shared by every device's server (they outlive them all): the daemon's
  // threads are these, one accepting thread per device and the threads of
  // its connections (see docs/design.md).
  WorkerPool disk_workers_;
  WorkerPool memory_workers_;
  TemplateRegistry templates_;

  Mutex mu_;
  bool shut_down_ GUARDED_BY(mu_) = false;
  // Devices by id; a null entry is one being made (its id taken).
  std::map<std::string, std::unique_ptr<Disk>> disks_ GUARDED_BY(mu_);
  std::map<std::string, std::unique_ptr<Memory>> memory_ GUARDED_BY(mu_);

  // Counts of devices that have ended, added to those of the devices
  // served, so that totals do not go down as devices end.
  std::atomic<uint64_t> ended_nbd_connections_{0};
  std::atomic<uint64_t> ended_uffd_connections_{0}, ended_prefetched_{0};
};

}  // namespace lazyblock::daemon
