// lazyblock serve nbd: a build's disk over NBD, until SIGINT or SIGTERM.
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "cli/commands.h"
#include "common/file_io.h"
#include "cli/flags.h"
#include "common/log.h"
#include "image/device.h"
#include "image/overlay.h"
#include "serve/nbd/nbd_server.h"

namespace lazyblock::cli {
namespace {

struct NbdFlags {
  StoreFlags store;
  std::string build;
  std::string name;
  std::string socket;
  std::string listen;
  std::string overlay;
  bool read_only = false;
  std::string log_level = "warn";
};

// "127.0.0.1:10809" -> host and port.
Result<std::pair<std::string, uint16_t>> parse_listen(const std::string& text) {
  const size_t colon = text.rfind(':');
  if (colon == std::string::npos) {
    return Status::invalid_argument(fmt::format("--listen '{}' is not HOST:PORT", text));
  }
  const std::string port = text.substr(colon + 1);
  char* end = nullptr;
  const unsigned long value = std::strtoul(port.c_str(), &end, 10);
  if (port.empty() || *end != '\0' || value > 65535) {
    return Status::invalid_argument(fmt::format("--listen '{}': bad port", text));
  }
  return std::pair{text.substr(0, colon), static_cast<uint16_t>(value)};
}

int run_nbd(const NbdFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  if (!flags.socket.empty() && !flags.listen.empty()) {
    return report_failure(Status::invalid_argument("give --socket or --listen, not both"));
  }
  if (flags.read_only && !flags.overlay.empty()) {
    return report_failure(Status::invalid_argument("--read-only takes no --overlay"));
  }
  Result<image::Uuid> build = image::Uuid::parse(flags.build);
  if (!build) return report_failure(build.status().with_context("--build"));
  Result<ChunkerOptions> options = chunker_options(flags.store);
  if (!options) return report_failure(options.status());
  Result<StoreStackOptions> stack = store_stack_options(flags.store);
  if (!stack) return report_failure(stack.status());
  Result<std::shared_ptr<ObjectStore>> store = open_store(flags.store.store, *stack);
  if (!store) return report_failure(store.status());
  auto files = std::make_shared<image::DataFiles>(*store, *options);
  Result<std::unique_ptr<image::Device>> device = image::Device::open(files, *build, flags.name);
  if (!device) return report_failure(device.status().with_context("serve nbd"));
  std::unique_ptr<image::Overlay> overlay;
  if (!flags.read_only) {
    std::optional<std::filesystem::path> kept;
    if (!flags.overlay.empty()) kept = flags.overlay;
    Result<std::unique_ptr<image::Overlay>> opened = image::Overlay::open(**device, kept);
    if (!opened) return report_failure(opened.status().with_context("serve nbd"));
    overlay = std::move(opened).value();
  }

  // SIGINT and SIGTERM end the server cleanly: blocked here (and so in every
  // thread started from now on), taken by one thread with sigwait.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  nbd::NbdServer server({flags.name, device->get(), overlay.get()});
  std::string where;
  if (!flags.listen.empty()) {
    Result<std::pair<std::string, uint16_t>> address = parse_listen(flags.listen);
    if (!address) return report_failure(address.status());
    if (Status s = server.listen_tcp(address->first, address->second); !s.is_ok()) {
      return report_failure(s);
    }
    where = fmt::format("nbd://{}:{}/{}", address->first, server.port(), flags.name);
  } else {
    std::string path = flags.socket;
    if (path.empty()) {
      path = (temp_directory() / fmt::format("lazyblock-{}-{}.sock", flags.build, flags.name))
                 .string();
    }
    if (Status s = server.listen_unix(path); !s.is_ok()) return report_failure(s);
    where = fmt::format("nbd+unix:///{}?socket={}", flags.name, path);
  }
  std::printf("serving %s of build %s (%llu bytes%s) at %s\n", flags.name.c_str(),
              flags.build.c_str(), static_cast<unsigned long long>((*device)->size()),
              flags.read_only ? ", read-only" : "", where.c_str());
  std::fflush(stdout);

  std::thread waiter([&] {
    int signal = 0;
    sigwait(&signals, &signal);
    log(LogLevel::kInfo, "serve nbd: signal {}: stopping", signal);
    server.stop();
  });
  const Status served = server.serve();
  // serve() ended by stop(): let the waiter go if it is still waiting.
  pthread_kill(waiter.native_handle(), SIGTERM);
  waiter.join();
  if (overlay) {
    if (Status s = overlay->flush(); !s.is_ok()) return report_failure(s);
  }
  if (!served.is_ok()) return report_failure(served.with_context("serve nbd"));
  return 0;
}

}  // namespace

CommandRunner add_serve_command(CLI::App& app) {
  CLI::App* serve = app.add_subcommand("serve", "Serve a build's devices to VMs");
  serve->require_subcommand(1);
  auto flags = std::make_shared<NbdFlags>();
  CLI::App* nbd = serve->add_subcommand(
      "nbd",
      "Serve a build's disk over NBD until SIGINT/SIGTERM: writes go to a copy-on-write overlay, "
      "the stored objects are never modified");
  add_store_flags(*nbd, flags->store);
  nbd->add_option("--build", flags->build, "The build's id (a UUID)")->required();
  nbd->add_option("--name", flags->name, "The device, also the export name: rootfs.ext4, ...")
      ->required();
  nbd->add_option("--socket", flags->socket,
                  "Unix socket to listen on, mode 0600 (default: $TMPDIR/lazyblock-BUILD-NAME.sock)");
  nbd->add_option("--listen", flags->listen, "TCP address instead, e.g. 127.0.0.1:10809");
  nbd->add_option("--overlay", flags->overlay,
                  "Keep the overlay here (and its block map in FILE.map) after exit, for "
                  "`pack --parent BUILD --overlay FILE`; an existing one is resumed");
  nbd->add_flag("--read-only", flags->read_only, "Refuse writes (EPERM)");
  add_log_flag(*nbd, flags->log_level);
  return [flags] { return run_nbd(*flags); };
}

}  // namespace lazyblock::cli
