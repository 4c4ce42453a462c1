// lazyblock daemon: the one process per host that serves every VM's disks
// and memory, driven by an HTTP API on a Unix socket (src/daemon/), until
// SIGINT or SIGTERM.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/stop_signals.h"
#include "common/file_io.h"
#include "common/log.h"
#include "common/unique_fd.h"
#include "common/units.h"
#include "common/unix_socket.h"
#include "daemon/daemon.h"
#include "daemon/http_server.h"
#include "daemon/metering_store.h"

namespace lazyblock::cli {
namespace {

struct DaemonFlags {
  StoreFlags store;
  std::string api;
  std::string work_dir;
  std::string cache_budget;
  std::string idle_ttl = "10m";
  std::string metrics_listen;
  std::string log_level = "info";
};

// $XDG_RUNTIME_DIR/lazyblock/api.sock, else /run/lazyblock/api.sock.
std::filesystem::path default_api_path() {
  const char* runtime = std::getenv("XDG_RUNTIME_DIR");
  const std::filesystem::path base =
      runtime != nullptr && runtime[0] != '\0' ? std::filesystem::path(runtime) : "/run";
  return base / "lazyblock" / "api.sock";
}

// A directory made if missing (mode 0700: what is in it is this user's);
// whether this call made it.
Result<bool> make_directory(const std::filesystem::path& dir) {
  std::error_code error;
  if (std::filesystem::is_directory(dir, error)) return false;
  if (!std::filesystem::create_directories(dir, error) || error) {
    return Status::io_error(fmt::format("cannot make {}: {}", dir.string(), error.message()));
  }
  ::chmod(dir.c_str(), 0700);
  return true;
}

// Removes a directory this run made, on every way out, if it is empty by
// then (a kept overlay the user put there stays, and so does the directory).
class MadeDirectory {
 public:
  MadeDirectory(std::filesystem::path path, bool made) : path_(std::move(path)), made_(made) {}
  ~MadeDirectory() {
    std::error_code ignored;  // not empty: kept, as it should be
    if (made_) std::filesystem::remove(path_, ignored);
  }
  MadeDirectory(const MadeDirectory&) = delete;
  MadeDirectory& operator=(const MadeDirectory&) = delete;

 private:
  const std::filesystem::path path_;
  const bool made_;
};

// A quarter of the file system `dir` is on.
Result<uint64_t> default_cache_budget(const std::filesystem::path& dir) {
  struct statvfs fs {};
  if (::statvfs(dir.c_str(), &fs) != 0) return posix_error("statvfs " + dir.string(), errno);
  return static_cast<uint64_t>(fs.f_blocks) * fs.f_frsize / 4;
}

// A TCP socket listening on `text` ("127.0.0.1:9100"; port 0: any free one).
Result<UniqueFd> listen_tcp(const std::string& text, uint16_t* port) {
  const size_t colon = text.rfind(':');
  const std::string host = colon == std::string::npos ? "" : text.substr(0, colon);
  char* end = nullptr;
  const std::string port_text = colon == std::string::npos ? "" : text.substr(colon + 1);
  const unsigned long value = std::strtoul(port_text.c_str(), &end, 10);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  if (port_text.empty() || *end != '\0' || value > 65535 ||
      ::inet_pton(AF_INET, host.c_str(), &address.sin_addr) != 1) {
    return Status::invalid_argument(
        fmt::format("--metrics-listen '{}' is not IPV4-ADDRESS:PORT", text));
  }
  address.sin_port = htons(static_cast<uint16_t>(value));
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return posix_error("socket", errno);
  const int on = 1;
  ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &on, sizeof on);
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0) {
    return posix_error("--metrics-listen: bind " + text, errno);
  }
  if (::listen(fd.get(), 64) != 0) return posix_error("--metrics-listen: listen", errno);
  socklen_t length = sizeof address;
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&address), &length);
  *port = ntohs(address.sin_port);
  return fd;
}

int run_daemon(const DaemonFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  Result<ChunkerOptions> chunker = chunker_options(flags.store);
  if (!chunker) return report_failure(chunker.status());
  Result<StoreStackOptions> stack = store_stack_options(flags.store);
  if (!stack) return report_failure(stack.status());
  Result<std::chrono::nanoseconds> idle_ttl = parse_duration(flags.idle_ttl);
  if (!idle_ttl) return report_failure(idle_ttl.status().with_context("--idle-ttl"));
  std::optional<uint64_t> cache_budget;
  if (!flags.cache_budget.empty()) {
    Result<uint64_t> budget = parse_size(flags.cache_budget);
    if (!budget) return report_failure(budget.status().with_context("--cache-budget"));
    cache_budget = *budget;
  }
  Result<std::shared_ptr<ObjectStore>> store = open_store(flags.store.store, *stack);
  if (!store) return report_failure(store.status());
  daemon::StoreMetrics store_metrics;
  auto metered = std::make_shared<daemon::MeteringStore>(*store, store_metrics);

  const std::filesystem::path work_dir =
      flags.work_dir.empty() ? temp_directory() / fmt::format("lazyblock-daemon-{}", ::getpid())
                             : std::filesystem::path(flags.work_dir);
  Result<bool> made_work_dir = make_directory(work_dir);
  if (!made_work_dir) return report_failure(made_work_dir.status().with_context("--work-dir"));
  const MadeDirectory work_dir_made(work_dir, *made_work_dir);
  const std::filesystem::path cache_dir = work_dir / "caches";
  Result<bool> made_cache_dir = make_directory(cache_dir);
  if (!made_cache_dir) return report_failure(made_cache_dir.status().with_context("--work-dir"));
  const MadeDirectory cache_dir_made(cache_dir, *made_cache_dir);
  if (!cache_budget) {
    Result<uint64_t> quarter = default_cache_budget(work_dir);
    if (!quarter) return report_failure(quarter.status());
    cache_budget = *quarter;
  }
  const std::filesystem::path api =
      flags.api.empty() ? default_api_path() : std::filesystem::path(flags.api);
  if (Result<bool> made = make_directory(api.parent_path()); !made) {
    return report_failure(made.status().with_context("--api"));
  }

  StopSignals signals;  // before any thread starts, so that none takes them
  {
    daemon::DaemonOptions options;
    options.templates.store = metered;
    options.templates.chunker = *chunker;
    options.templates.cache_dir = cache_dir;
    options.templates.cache_budget = *cache_budget;
    options.templates.idle_ttl = *idle_ttl;
    options.work_dir = work_dir;
    options.version = LAZYBLOCK_VERSION;
    daemon::Daemon service(options, store_metrics);

    Result<std::unique_ptr<UnixListener>> listener = UnixListener::listen(api);
    if (!listener) return report_failure(listener.status().with_context("--api"));
    Result<std::unique_ptr<daemon::HttpServer>> server = daemon::HttpServer::start(
        (*listener)->fd(),
        [&](const daemon::HttpRequest& request) { return service.handle(request); }, "daemon API");
    if (!server) return report_failure(server.status());

    UniqueFd metrics_fd;
    std::unique_ptr<daemon::HttpServer> metrics_server;
    std::string metrics_where;
    if (!flags.metrics_listen.empty()) {
      uint16_t port = 0;
      Result<UniqueFd> fd = listen_tcp(flags.metrics_listen, &port);
      if (!fd) return report_failure(fd.status());
      metrics_fd = std::move(fd).value();
      Result<std::unique_ptr<daemon::HttpServer>> started = daemon::HttpServer::start(
          metrics_fd.get(),
          [&](const daemon::HttpRequest& request) -> daemon::HttpResponse {
            if (request.path == "/metrics" && request.method == "GET") {
              return service.handle(request);
            }
            return {404, "text/plain", "only GET /metrics is served here\n"};
          },
          "daemon metrics", 8);
      if (!started) return report_failure(started.status());
      metrics_server = std::move(started).value();
      metrics_where =
          fmt::format(", metrics at http://{}:{}/metrics",
                      flags.metrics_listen.substr(0, flags.metrics_listen.rfind(':')), port);
    }

    std::mutex mu;
    std::condition_variable stop_asked;
    bool stopping = false;
    signals.on_signal([&] {
      std::lock_guard lock(mu);
      stopping = true;
      stop_asked.notify_all();
    });
    std::printf("lazyblock daemon: API at %s%s; store %s, work dir %s, cache budget %s\n",
                api.c_str(), metrics_where.c_str(), metered->describe().c_str(), work_dir.c_str(),
                format_size(*cache_budget).c_str());
    std::fflush(stdout);
    {
      std::unique_lock lock(mu);
      stop_asked.wait(lock, [&] { return stopping; });
    }
    log(LogLevel::kInfo, "daemon: stopping: no more API calls; ending every device");
    // A PUT that waits on a stalled store (its template's header, a fetch)
    // must not hold the exit: its loads and fetches are cancelled, so that
    // it ends (500) before the API server, which waits for calls in
    // progress, stops.
    metered->cancel();
    service.cancel_fetches();
    (*server)->stop();  // calls in progress finish first
    if (metrics_server) metrics_server->stop();
    service.shutdown();
    signals.stop_waiting();
    // The listener removes its socket as it goes.
  }
  return 0;  // the caches went with their templates; the directories we made go now
}

}  // namespace

CommandRunner add_daemon_command(CLI::App& app) {
  auto flags = std::make_shared<DaemonFlags>();
  CLI::App* command = app.add_subcommand(
      "daemon",
      "Serve every VM of this host from one process, until SIGINT/SIGTERM: an HTTP/1.1 + JSON "
      "API on a Unix socket creates and ends disks (NBD) and memory devices (UFFD); all devices "
      "of one build's device share one template (chunkers and block caches), so the second VM "
      "reads what the first fetched. SIGINT/SIGTERM stop taking API calls, end every device "
      "(overlays flushed) and exit 0. See README, 'Running on a host'");
  add_store_flags(*command, flags->store);
  command->add_option("--api", flags->api,
                      "Unix socket of the API, mode 0600 (default: "
                      "$XDG_RUNTIME_DIR/lazyblock/api.sock, else /run/lazyblock/api.sock)");
  command->add_option("--work-dir", flags->work_dir,
                      "Block caches and temporary overlays live here (default: "
                      "$TMPDIR/lazyblock-daemon-PID)");
  command->add_option("--cache-budget", flags->cache_budget,
                      "Bound on the bytes of all block caches: beyond it idle templates are "
                      "evicted, least recently used first (default: 25% of the work dir's file "
                      "system)");
  command
      ->add_option("--idle-ttl", flags->idle_ttl,
                   "How long a template nobody uses stays cached, e.g. 30s, 10m")
      ->capture_default_str();
  command->add_option("--metrics-listen", flags->metrics_listen,
                      "Also serve GET /metrics over TCP here, e.g. 127.0.0.1:9100");
  add_log_flag(*command, flags->log_level);
  return [flags] { return run_daemon(*flags); };
}

}  // namespace lazyblock::cli
