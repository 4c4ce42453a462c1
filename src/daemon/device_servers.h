// device_servers: how a build's device comes to be served, shared by the
// daemon (every device of its API) and by `serve nbd` / `serve uffd` (one
// device, its own process): the device opened from its header, a disk's
// overlay and NBD server, a memory device's prefetch plan. Each caller
// chooses where the server listens and runs serve() on a thread of its own.
//
// Data flow: open_device() (header, data file sizes) -> a Device shared by
// any number of servers -> DiskServer::open() (overlay over it, or none if
// read-only; the export metered if asked; an NbdServer on a given pool or
// its own) -> listen, serve(), stop() -> DiskServer::retire() (the server
// gone, then the overlay flushed).
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "chunk/chunker.h"
#include "common/status.h"
#include "common/worker_pool.h"
#include "daemon/metered_disk.h"
#include "image/device.h"
#include "image/overlay.h"
#include "serve/connection_limits.h"
#include "serve/nbd/nbd_server.h"
#include "serve/serve_observer.h"
#include "serve/uffd/page_record.h"
#include "storage/object_store.h"

namespace lazyblock::daemon {

// A build's device and the data files it reads through.
struct OpenedDevice {
  std::shared_ptr<image::DataFiles> files;
  std::unique_ptr<image::Device> device;
};

// Device `name` of `build` through `store`, its header read and its data
// files' sizes learned, so that a VM's first reads do not wait for them.
// kNotFound if the store has no such device (or a data file it maps into).
Result<OpenedDevice> open_device(std::shared_ptr<ObjectStore> store, const ChunkerOptions& options,
                                 const image::Uuid& build, const std::string& name);

// The pages to prefetch at each connect: the record kept beside the build
// (BUILD/NAME.prefetch), none if it has none.
Result<std::vector<uffd::PageRun>> stored_prefetch_plan(ObjectStore& store,
                                                        const image::Uuid& build,
                                                        const std::string& name,
                                                        std::chrono::nanoseconds timeout);

struct DiskServerOptions {
  std::string name;  // the export's name
  bool read_only = false;
  // A kept overlay there (see Overlay::open), else a temporary one in
  // `temp_dir` (the system's temporary directory if empty).
  std::optional<std::filesystem::path> overlay;
  std::filesystem::path temp_dir;
  ConnectionLimits limits;
  WorkerPool* workers = nullptr;       // a shared pool (outliving the server), else its own
  ServeObserver* observer = nullptr;   // of its requests, if any
  BlockReadObserver* reads = nullptr;  // if set, the export is a MeteredDisk reporting here
};

// One disk served over NBD: its overlay, its export, its server.
class DiskServer {
 public:
  // Nothing listens yet: listen with server().listen_unix() or listen_tcp().
  static Result<std::unique_ptr<DiskServer>> open(image::Device& device,
                                                  const DiskServerOptions& options);
  // retire(), if not yet (its flush's error logged).
  ~DiskServer();

  nbd::NbdServer& server() { return *server_; }
  // Null when not metered.
  const MeteredDisk* metered() const { return metered_.get(); }

  // Once serve() has returned: ends the server (its sessions are gone, so
  // nothing writes to the overlay any more), then flushes the overlay.
  // Idempotent.
  Status retire();

 private:
  DiskServer() = default;

  std::unique_ptr<image::Overlay> overlay_;  // null: read-only
  std::unique_ptr<MeteredDisk> metered_;
  std::unique_ptr<nbd::NbdServer> server_;
};

}  // namespace lazyblock::daemon
