// lazyblock serve nbd|uffd: a build's disk over NBD, or its guest memory to
// Firecracker as a UFFD handler, until SIGINT or SIGTERM.
#include <signal.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/stop_signals.h"
#include "common/file_io.h"
#include "common/log.h"
#include "common/units.h"
#include "daemon/device_servers.h"
#include "image/device.h"
#include "serve/connection_limits.h"
#include "serve/nbd/nbd_server.h"
#include "serve/uffd/uffd_server.h"

namespace lazyblock::cli {
namespace {

// What a server lets its clients hold (see ConnectionLimits).
struct LimitFlags {
  size_t max_connections = 0;
  std::string handshake_timeout = "10s";
};

void add_limit_flags(CLI::App& command, LimitFlags& flags) {
  command.add_option("--max-connections", flags.max_connections,
                     "Connections served at once; more are refused (closed at once). 0: sized "
                     "from the open-files limit (RLIMIT_NOFILE), leaving a quarter for caches");
  command
      .add_option("--handshake-timeout", flags.handshake_timeout,
                  "(testing) Close a client that has not finished its handshake this soon")
      ->capture_default_str()
      ->group("Testing");
}

Result<ConnectionLimits> connection_limits(const LimitFlags& flags) {
  Result<std::chrono::nanoseconds> timeout = parse_duration(flags.handshake_timeout);
  if (!timeout) return timeout.status().with_context("--handshake-timeout");
  const auto milliseconds = std::chrono::duration_cast<std::chrono::milliseconds>(*timeout);
  if (milliseconds.count() <= 0) {
    return Status::invalid_argument("--handshake-timeout must be at least 1ms");
  }
  return ConnectionLimits{flags.max_connections, milliseconds};
}

struct NbdFlags {
  StoreFlags store;
  std::string build;
  std::string name;
  std::string socket;
  std::string listen;
  std::string overlay;
  bool read_only = false;
  LimitFlags limits;
  std::string log_level = "warn";
};

// "127.0.0.1:10809", "localhost:10809", "[::1]:10809" -> host and port.
Result<std::pair<std::string, uint16_t>> parse_listen(const std::string& text) {
  const size_t colon = text.rfind(':');
  std::string host = colon == std::string::npos ? "" : text.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);  // an IPv6 literal
  } else if (host.find(':') != std::string::npos) {
    host.clear();  // an IPv6 address without brackets: its port is ambiguous
  }
  if (host.empty()) {
    return Status::invalid_argument(fmt::format(
        "--listen '{}' is not HOST:PORT (e.g. 127.0.0.1:10809, localhost:10809, [::1]:10809)",
        text));
  }
  const std::string port = text.substr(colon + 1);
  char* end = nullptr;
  const unsigned long value = std::strtoul(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || value > 65535) {
    return Status::invalid_argument(fmt::format("--listen '{}': bad port", text));
  }
  return std::pair{host, static_cast<uint16_t>(value)};
}

struct UffdFlags {
  StoreFlags store;
  std::string build;
  std::string name = "memfile";
  std::string socket;
  std::string record;
  std::string prefetch;
  bool no_prefetch = false;
  LimitFlags limits;
  std::string log_level = "warn";
};

// Device `name` of `build` (a UUID) through the store the flags describe,
// opened as the daemon opens its templates.
Result<daemon::OpenedDevice> open_served_device(const StoreFlags& flags, const std::string& build,
                                                const std::string& name) {
  Result<image::Uuid> id = image::Uuid::parse(build);
  if (!id) return id.status().with_context("--build");
  Result<ChunkerOptions> options = chunker_options(flags);
  if (!options) return options.status();
  Result<StoreStackOptions> stack = store_stack_options(flags);
  if (!stack) return stack.status();
  Result<std::shared_ptr<ObjectStore>> store = open_store(flags.store, *stack);
  if (!store) return store.status();
  return daemon::open_device(*store, *options, *id, name);
}

// The pages to prefetch: --prefetch PATH, else the record kept beside the
// build (BUILD/NAME.prefetch) if there is one, none with --no-prefetch.
Result<std::vector<uffd::PageRun>> prefetch_plan(const UffdFlags& flags, ObjectStore& store,
                                                 const image::Uuid& build,
                                                 std::chrono::nanoseconds timeout) {
  if (flags.no_prefetch) return std::vector<uffd::PageRun>();
  if (!flags.prefetch.empty()) {
    Result<std::vector<uffd::PageRun>> runs = uffd::read_page_record(flags.prefetch);
    if (!runs) return runs.status().with_context("--prefetch");
    return runs;
  }
  return daemon::stored_prefetch_plan(store, build, flags.name, timeout);
}

int run_uffd(const UffdFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  Result<daemon::OpenedDevice> served_device =
      open_served_device(flags.store, flags.build, flags.name);
  if (!served_device) return report_failure(served_device.status().with_context("serve uffd"));
  image::DataFiles& files = *served_device->files;
  std::unique_ptr<image::Device>& memfile = served_device->device;
  Result<ConnectionLimits> limits = connection_limits(flags.limits);
  if (!limits) return report_failure(limits.status());
  uffd::UffdOptions uffd_options;
  uffd_options.record = flags.record;
  uffd_options.limits = *limits;
  Result<std::vector<uffd::PageRun>> plan = prefetch_plan(
      flags, files.store(), memfile->header().build_id, files.options().fetch_timeout);
  if (!plan) return report_failure(plan.status());
  uint64_t prefetch_bytes = 0;
  for (const uffd::PageRun& run : *plan) prefetch_bytes += run.length;
  uffd_options.prefetch = std::move(plan).value();

  StopSignals signals;
  uffd::UffdServer server(*memfile, std::move(uffd_options));
  std::string path = flags.socket;
  if (path.empty()) {
    path =
        (temp_directory() / fmt::format("lazyblock-{}-{}.sock", flags.build, flags.name)).string();
  }
  if (Status s = server.listen_unix(path); !s.is_ok()) return report_failure(s);
  std::printf(
      "serving %s of build %s (%s) to Firecracker at %s; prefetching %s at each "
      "connect\n",
      flags.name.c_str(), flags.build.c_str(), format_size(memfile->size()).c_str(), path.c_str(),
      format_size(prefetch_bytes).c_str());
  std::fflush(stdout);
  // Fetches in flight are cancelled, not waited for: a slow store must not
  // hold the exit.
  signals.on_signal([&] {
    server.stop();
    files.cancel();
  });
  const Status served = server.serve();
  signals.stop_waiting();  // its stop() may still be running: before the server goes
  if (!served.is_ok()) return report_failure(served.with_context("serve uffd"));
  return 0;
}

int run_nbd(const NbdFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  if (!flags.socket.empty() && !flags.listen.empty()) {
    return report_failure(Status::invalid_argument("give --socket or --listen, not both"));
  }
  if (flags.read_only && !flags.overlay.empty()) {
    return report_failure(Status::invalid_argument("--read-only takes no --overlay"));
  }
  Result<ConnectionLimits> limits = connection_limits(flags.limits);
  if (!limits) return report_failure(limits.status());
  Result<daemon::OpenedDevice> served_device =
      open_served_device(flags.store, flags.build, flags.name);
  if (!served_device) return report_failure(served_device.status().with_context("serve nbd"));
  std::unique_ptr<image::Device>& device = served_device->device;
  daemon::DiskServerOptions options;
  options.name = flags.name;
  options.read_only = flags.read_only;
  if (!flags.overlay.empty()) options.overlay = flags.overlay;
  options.limits = *limits;
  StopSignals signals;  // before the server's threads start, so that none takes them
  Result<std::unique_ptr<daemon::DiskServer>> disk = daemon::DiskServer::open(*device, options);
  if (!disk) return report_failure(disk.status().with_context("serve nbd"));
  nbd::NbdServer& server = (*disk)->server();
  std::string where;
  if (!flags.listen.empty()) {
    Result<std::pair<std::string, uint16_t>> address = parse_listen(flags.listen);
    if (!address) return report_failure(address.status());
    if (Status s = server.listen_tcp(address->first, address->second); !s.is_ok()) {
      return report_failure(s);
    }
    const bool ipv6 = address->first.find(':') != std::string::npos;
    where = fmt::format("nbd://{}:{}/{}", ipv6 ? "[" + address->first + "]" : address->first,
                        server.port(), flags.name);
  } else {
    std::string path = flags.socket;
    if (path.empty()) {
      path = (temp_directory() / fmt::format("lazyblock-{}-{}.sock", flags.build, flags.name))
                 .string();
    }
    if (Status s = server.listen_unix(path); !s.is_ok()) return report_failure(s);
    // Absolute, so that the URI works from any directory.
    where = fmt::format("nbd+unix:///{}?socket={}", flags.name,
                        std::filesystem::absolute(path).string());
  }
  std::printf("serving %s of build %s (%llu bytes%s) at %s\n", flags.name.c_str(),
              flags.build.c_str(), static_cast<unsigned long long>(device->size()),
              flags.read_only ? ", read-only" : "", where.c_str());
  std::fflush(stdout);

  // Requests waiting on fetches get ESHUTDOWN at once instead of waiting
  // for a slow store; then the overlay is flushed.
  signals.on_signal([&] {
    server.stop();
    served_device->files->cancel();
  });
  const Status served = server.serve();
  signals.stop_waiting();  // its stop() may still be running: before the server goes
  if (Status s = (*disk)->retire(); !s.is_ok()) return report_failure(s);
  if (!served.is_ok()) return report_failure(served.with_context("serve nbd"));
  return 0;
}

}  // namespace

CommandRunner add_serve_command(CLI::App& app) {
  CLI::App* serve = app.add_subcommand("serve", "Serve a build's devices to VMs");
  serve->require_subcommand(1);
  auto uffd_flags = std::make_shared<UffdFlags>();
  CLI::App* uffd = serve->add_subcommand(
      "uffd",
      "Serve a build's guest memory to Firecracker as its UFFD handler (snapshot/load with "
      "mem_backend UFFD and this socket), until SIGINT/SIGTERM: page faults are served from the "
      "store, cached pages at once; a recorded working set is prefetched at each connect. "
      "SIGINT/SIGTERM cancel the fetches in flight and exit at once; a VM that has not sent "
      "its mappings and descriptor within 10 s is closed");
  add_store_flags(*uffd, uffd_flags->store);
  uffd->add_option("--build", uffd_flags->build, "The build's id (a UUID)")->required();
  uffd->add_option("--name", uffd_flags->name, "The memory device")->capture_default_str();
  uffd->add_option("--socket", uffd_flags->socket,
                   "Unix socket to listen on, mode 0600 (default: "
                   "$TMPDIR/lazyblock-BUILD-NAME.sock)");
  uffd->add_option("--record", uffd_flags->record,
                   "Write each VM's first-fault order (a page record) here when it ends; upload "
                   "it as BUILD/NAME.prefetch to prefetch it on later restores. Record with "
                   "--no-prefetch: pages the prefetch installs raise no fault to record");
  uffd->add_option("--prefetch", uffd_flags->prefetch,
                   "Prefetch the pages of this page record at each connect (default: "
                   "BUILD/NAME.prefetch from the store, if there is one)");
  uffd->add_flag("--no-prefetch", uffd_flags->no_prefetch, "Prefetch nothing");
  add_limit_flags(*uffd, uffd_flags->limits);
  add_log_flag(*uffd, uffd_flags->log_level);
  auto flags = std::make_shared<NbdFlags>();
  CLI::App* nbd = serve->add_subcommand(
      "nbd",
      "Serve a build's disk over NBD until SIGINT/SIGTERM: writes go to a copy-on-write overlay, "
      "the stored objects are never modified. SIGINT/SIGTERM cancel the fetches in flight "
      "(their requests fail with ESHUTDOWN), flush the overlay and exit at once; a client that "
      "has not finished its handshake within 10 s is closed");
  add_store_flags(*nbd, flags->store);
  nbd->add_option("--build", flags->build, "The build's id (a UUID)")->required();
  nbd->add_option("--name", flags->name, "The device, also the export name: rootfs.ext4, ...")
      ->required();
  nbd->add_option(
      "--socket", flags->socket,
      "Unix socket to listen on, mode 0600 (default: $TMPDIR/lazyblock-BUILD-NAME.sock)");
  nbd->add_option("--listen", flags->listen, "TCP address instead, e.g. 127.0.0.1:10809");
  nbd->add_option(
      "--overlay", flags->overlay,
      "Keep the overlay here (and its block map in FILE.map) after exit, for "
      "`pack --parent BUILD --overlay FILE`; an existing one is resumed if it was made over this "
      "very device (it records which), refused otherwise");
  nbd->add_flag("--read-only", flags->read_only, "Refuse writes (EPERM)");
  add_limit_flags(*nbd, flags->limits);
  add_log_flag(*nbd, flags->log_level);
  return [serve, uffd, uffd_flags, flags] {
    if (serve->got_subcommand(uffd)) return run_uffd(*uffd_flags);
    return run_nbd(*flags);
  };
}

}  // namespace lazyblock::cli
