#include "daemon/device_servers.h"

#include "common/log.h"
#include "common/units.h"

namespace lazyblock::daemon {
namespace {

// The largest page record a build may keep beside its memfile.
constexpr uint64_t kMaxPageRecordBytes = 64 * kMiB;

}  // namespace

Result<OpenedDevice> open_device(std::shared_ptr<ObjectStore> store, const ChunkerOptions& options,
                                 const image::Uuid& build, const std::string& name) {
  OpenedDevice opened{std::make_shared<image::DataFiles>(std::move(store), options), nullptr};
  Result<std::unique_ptr<image::Device>> device = image::Device::open(opened.files, build, name);
  if (!device) return device.status();
  LB_RETURN_IF_ERROR((*device)->learn_sizes());
  opened.device = std::move(device).value();
  return opened;
}

Result<std::vector<uffd::PageRun>> stored_prefetch_plan(ObjectStore& store,
                                                        const image::Uuid& build,
                                                        const std::string& name,
                                                        std::chrono::nanoseconds timeout) {
  const std::string key = image::data_key(build, name) + ".prefetch";
  Result<std::vector<std::byte>> bytes =
      image::read_small_object(store, key, kMaxPageRecordBytes, timeout);
  if (!bytes) {
    if (bytes.status().code() == StatusCode::kNotFound) return std::vector<uffd::PageRun>();
    return bytes.status().with_context("prefetch record");
  }
  Result<std::vector<uffd::PageRun>> runs = uffd::parse_page_record(
      std::string_view(reinterpret_cast<const char*>(bytes->data()), bytes->size()));
  if (!runs) return runs.status().with_context(key);
  return runs;
}

Result<std::unique_ptr<DiskServer>> DiskServer::open(image::Device& device,
                                                     const DiskServerOptions& options) {
  std::unique_ptr<DiskServer> disk(new DiskServer);
  if (!options.read_only) {
    Result<std::unique_ptr<image::Overlay>> overlay =
        image::Overlay::open(device, options.overlay, options.temp_dir);
    if (!overlay) return overlay.status();
    disk->overlay_ = std::move(overlay).value();
  }
  image::Disk* exported = disk->overlay_ ? static_cast<image::Disk*>(disk->overlay_.get())
                                         : static_cast<image::Disk*>(&device);
  if (options.reads != nullptr) {
    disk->metered_ = std::make_unique<MeteredDisk>(*exported, disk->overlay_.get(), *options.reads);
    exported = disk->metered_.get();
  }
  const nbd::Export served{options.name, *exported};
  disk->server_ = options.workers != nullptr
                      ? std::make_unique<nbd::NbdServer>(served, options.limits, *options.workers)
                      : std::make_unique<nbd::NbdServer>(served, options.limits);
  if (options.observer != nullptr) disk->server_->set_observer(options.observer);
  return disk;
}

DiskServer::~DiskServer() {
  if (Status s = retire(); !s.is_ok())
    log(LogLevel::kError, "flushing an overlay: {}", s.message());
}

Status DiskServer::retire() {
  server_.reset();
  metered_.reset();
  Status flushed = Status::ok();
  if (overlay_) flushed = overlay_->flush();
  overlay_.reset();
  return flushed;
}

}  // namespace lazyblock::daemon
