#include "testing/nginx_server.h"

#include "testing/local_port.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <fstream>
#include <iterator>
#include <thread>

#include <fmt/format.h>

namespace lazyblock::testing {
namespace {

constexpr const char* kModules = "/usr/lib/nginx/modules";

// The project's nginx configuration: a static server, and lua locations that
// behave as remote stores do when far away or broken. {dir}, {docroot} and
// {port} are filled in.
constexpr const char* kConfig = R"CONF(
load_module {modules}/ndk_http_module.so;
load_module {modules}/ngx_http_lua_module.so;
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  log_format lazyblock '$connection $request_method $uri $status $bytes_sent';
  access_log {dir}/access.log lazyblock;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  keepalive_requests 100000;
  keepalive_timeout 60s;
  default_type application/octet-stream;
  sendfile on;
  lua_package_path "{dir}/?.lua;;";
  lua_shared_dict outages 1m;

  server {{
    listen 127.0.0.1:{port};
    root {docroot};
    add_header X-Connection-Requests $connection_requests always;

    location / {{ }}
    location /full/ {{
      alias {docroot}/;
      max_ranges 0;
    }}
    location /shaped/ {{
      content_by_lua_block {{
        local store = require("store")
        store.serve("/shaped/", {{ ttfb_ms = tonumber(ngx.var.arg_ttfb_ms) or 20,
                                   mbps = tonumber(ngx.var.arg_mbps) or 100 }})
      }}
    }}
    location /truncated/ {{
      content_by_lua_block {{ require("store").serve("/truncated/", {{ truncate = true }}) }}
    }}
    location /wrong-range/ {{
      content_by_lua_block {{ require("store").serve("/wrong-range/", {{ shift = 1 }}) }}
    }}
    location /stall/ {{
      content_by_lua_block {{ require("store").serve("/stall/", {{ stall_after = 65536 }}) }}
    }}
    location /slow/ {{
      content_by_lua_block {{
        local arrived = io.open("{dir}/slow-arrived", "w") arrived:close()
        ngx.sleep(60)
        require("store").serve("/slow/", {{}})
      }}
    }}
    location ~ ^/failing-for/(\d+)/(.+)$ {{
      access_by_lua_block {{
        -- The first request for the key starts its outage.
        ngx.update_time()
        local outages = ngx.shared.outages
        outages:add(ngx.var[2], ngx.now())
        if ngx.now() - outages:get(ngx.var[2]) < tonumber(ngx.var[1]) then
          return ngx.exit(500)
        end
      }}
      alias {docroot}/$2;
    }}
    location ~ ^/status/(\d+)/ {{
      content_by_lua_block {{ ngx.exit(tonumber(ngx.var[1])) }}
    }}
  }}
}}
)CONF";

// The lua that serves a file's range, shaped or broken as asked.
constexpr const char* kStoreLua = R"LUA(
local M = {}
local root = "{docroot}"

function M.serve(prefix, opts)
  ngx.header["X-Connection-Requests"] = ngx.var.connection_requests
  ngx.header["Accept-Ranges"] = "bytes"
  if opts.ttfb_ms then ngx.sleep(opts.ttfb_ms / 1000) end
  local key = ngx.var.uri:sub(#prefix + 1)
  if key:find("%.%.") then return ngx.exit(403) end
  local f = io.open(root .. "/" .. key, "rb")
  if not f then return ngx.exit(404) end
  local size = f:seek("end")
  local first, last, status = 0, size - 1, 200
  local range = ngx.var.http_range
  if range then
    local a, b = range:match("^bytes=(%d+)-(%d*)$")
    if not a then f:close() return ngx.exit(416) end
    first = tonumber(a)
    if b ~= "" then last = math.min(tonumber(b), size - 1) end
    if first >= size then
      f:close()
      ngx.header["Content-Range"] = "bytes */" .. size
      return ngx.exit(416)
    end
    status = 206
    local shift = opts.shift or 0
    ngx.header["Content-Range"] = string.format("bytes %d-%d/%d", first + shift, last + shift, size)
  end
  local length = last - first + 1
  ngx.status = status
  ngx.header["Content-Length"] = length
  ngx.header["Content-Type"] = "application/octet-stream"
  local send = length
  if opts.truncate then send = math.floor(length / 2) end
  f:seek("set", first)
  local start = ngx.now()
  local sent = 0
  while sent < send do
    local piece = math.min(65536, send - sent)
    if opts.mbps then
      -- Pace against the clock from the first byte: byte n leaves at n / rate.
      ngx.update_time()
      local due = start + sent / (opts.mbps * 1e6)
      local wait = due - ngx.now()
      if wait > 0 then ngx.sleep(wait) end
    end
    ngx.print(f:read(piece))
    ngx.flush(true)
    sent = sent + piece
    if opts.stall_after and sent >= opts.stall_after then ngx.sleep(60) end
  end
  f:close()
  if opts.truncate then return ngx.exit(ngx.ERROR) end  -- closes the connection mid-body
end

return M
)LUA";

void replace_all(std::string& text, const std::string& from, const std::string& to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size())) {
    text.replace(at, from.size(), to);
  }
}

std::string slurp(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

Result<std::unique_ptr<NginxServer>> NginxServer::start(
    std::optional<std::filesystem::path> docroot_option) {
  const char* nginx = "/usr/sbin/nginx";
  if (::access(nginx, X_OK) != 0 ||
      ::access((std::string(kModules) + "/ngx_http_lua_module.so").c_str(), R_OK) != 0) {
    return Status::not_found(
        "nginx with its lua module is not installed (scripts/install-deps installs nginx-core "
        "and libnginx-mod-http-lua)");
  }
  // A port found free may be taken before nginx binds it: try a few.
  Status last_failure;
  for (int attempt = 0; attempt < 5; ++attempt) {
    Result<ScratchDir> dir = ScratchDir::create();
    if (!dir) return dir.status();
    Result<uint16_t> port = free_port();
    if (!port) return port.status();
    const std::filesystem::path root = dir->path();
    const std::filesystem::path docroot =
        docroot_option ? std::filesystem::absolute(*docroot_option) : root / "docroot";
    std::filesystem::create_directories(docroot);
    std::filesystem::create_directories(root / "tmp");
    std::string config = kConfig;
    std::string lua = kStoreLua;
    // The config's braces are doubled for the format-like placeholders.
    replace_all(config, "{{", "\x01");
    replace_all(config, "}}", "\x02");
    for (std::string* text : {&config, &lua}) {
      replace_all(*text, "{modules}", kModules);
      replace_all(*text, "{dir}", root.string());
      replace_all(*text, "{docroot}", docroot.string());
      replace_all(*text, "{port}", std::to_string(*port));
    }
    replace_all(config, "\x01", "{");
    replace_all(config, "\x02", "}");
    std::ofstream(root / "nginx.conf") << config;
    std::ofstream(root / "store.lua") << lua;

    const pid_t pid = ::fork();
    if (pid < 0) return posix_error("fork", errno);
    if (pid == 0) {
      ::setpgid(0, 0);
      const std::string conf = (root / "nginx.conf").string();
      const std::string prefix = root.string() + "/";
      const std::string error_log = (root / "error.log").string();
      ::execl(nginx, "nginx", "-p", prefix.c_str(), "-c", conf.c_str(), "-e",
              error_log.c_str(), static_cast<char*>(nullptr));
      ::_exit(127);
    }
    // Ready once it accepts connections, or failed once it exits.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    int status = 0;
    bool exited = false;
    while (std::chrono::steady_clock::now() < deadline) {
      if (accepts_connections(*port)) {
        return std::unique_ptr<NginxServer>(
            new NginxServer(std::move(dir).value(), docroot, *port, pid));
      }
      if (::waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a real condition
    }
    if (!exited) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
    }
    last_failure = Status::io_error(fmt::format("nginx did not start on port {}: {}", *port,
                                                slurp(root / "error.log")));
    if (slurp(root / "error.log").find("Address already in use") == std::string::npos) break;
  }
  return last_failure;
}

NginxServer::NginxServer(ScratchDir dir, std::filesystem::path docroot, uint16_t port, pid_t pid)
    : dir_(std::move(dir)), docroot_(std::move(docroot)), port_(port), pid_(pid) {}

NginxServer::~NginxServer() {
  ::kill(pid_, SIGKILL);
  int status = 0;
  ::waitpid(pid_, &status, 0);
}

std::string NginxServer::url() const { return fmt::format("http://127.0.0.1:{}", port_); }

std::string NginxServer::access_log() const { return slurp(dir_.path() / "access.log"); }

bool NginxServer::slow_request_arrived() const {
  return std::filesystem::exists(dir_.path() / "slow-arrived");
}

}  // namespace lazyblock::testing
