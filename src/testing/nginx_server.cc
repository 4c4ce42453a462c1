#include "testing/nginx_server.h"

#include "testing/local_port.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <cctype>
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
  log_format lazyblock '$connection $request_method $uri $status $bytes_sent '
                       '$connection_requests $ssl_session_reused $server_protocol';
  access_log {dir}/access.log lazyblock;
  client_body_temp_path {dir}/tmp/body;
  proxy_temp_path {dir}/tmp/proxy;
  fastcgi_temp_path {dir}/tmp/fastcgi;
  uwsgi_temp_path {dir}/tmp/uwsgi;
  scgi_temp_path {dir}/tmp/scgi;
  keepalive_requests 100000;
  # No bound on uploads (to a proxied S3 server), set here and not only in
  # the location: HTTP/2 body bytes that come before the request is routed
  # are held to the server's bound.
  client_max_body_size 0;
  keepalive_timeout 60s;
  default_type application/octet-stream;
  sendfile on;
  lua_package_path "{dir}/?.lua;;";
  lua_shared_dict outages 1m;

  server {{
    listen 127.0.0.1:{port}{listen_options};
    root {docroot};
{tls}
    add_header X-Connection-Requests $connection_requests always;

    location / {{ {proxy} }}
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
  -- A HEAD is answered after the first-byte delay alone, as a cloud store
  -- answers it: pacing the body nginx would not send kept the connection
  -- busy for the whole object's transfer time.
  if ngx.req.get_method() == "HEAD" then
    f:close()
    ngx.send_headers()
    return
  end
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

// Runs `args` (the program found on PATH), its output to `log`; fails with
// that output if it does not exit with 0.
Status run_command(const std::vector<std::string>& args, const std::filesystem::path& log) {
  SpawnOptions options;
  options.stdout_to = log;
  options.stderr_to = log;
  options.search_path = true;
  Result<ChildProcess> child = ChildProcess::spawn(args, options);
  if (!child) return child.status();
  if (child->wait() != 0) {
    return Status::io_error(fmt::format("{} failed: {}", args.front(), slurp(log)));
  }
  return Status::ok();
}

}  // namespace

Result<TestCertificates> TestCertificates::make(const std::filesystem::path& dir,
                                                const std::vector<std::string>& names) {
  std::filesystem::create_directories(dir);
  TestCertificates made{dir / "ca.pem", dir / "server.pem", dir / "server.key"};
  const std::filesystem::path ca_key = dir / "ca.key";
  const std::filesystem::path request = dir / "server.csr";
  const std::filesystem::path extensions = dir / "server.ext";
  const std::filesystem::path log = dir / "openssl.log";
  // P-256 keys: as good as RSA for a test, and made in milliseconds.
  LB_RETURN_IF_ERROR(run_command({"openssl",
                                  "req",
                                  "-x509",
                                  "-newkey",
                                  "ec",
                                  "-pkeyopt",
                                  "ec_paramgen_curve:prime256v1",
                                  "-nodes",
                                  "-keyout",
                                  ca_key.string(),
                                  "-out",
                                  made.ca.string(),
                                  "-days",
                                  "2",
                                  "-subj",
                                  "/CN=lazyblock test CA",
                                  "-addext",
                                  "basicConstraints=critical,CA:TRUE",
                                  "-addext",
                                  "keyUsage=critical,keyCertSign,cRLSign"},
                                 log));
  LB_RETURN_IF_ERROR(
      run_command({"openssl", "req", "-new", "-newkey", "ec", "-pkeyopt",
                   "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", made.key.string(), "-out",
                   request.string(), "-subj", "/CN=" + names.front()},
                  log));
  std::string alt_names;
  for (const std::string& name : names) {
    const bool address = !name.empty() && (std::isdigit(static_cast<unsigned char>(name[0])) ||
                                           name.find(':') != std::string::npos);
    alt_names += fmt::format("{}{}:{}", alt_names.empty() ? "" : ",", address ? "IP" : "DNS", name);
  }
  std::ofstream(extensions) << "subjectAltName=" << alt_names
                            << "\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n";
  LB_RETURN_IF_ERROR(
      run_command({"openssl", "x509", "-req", "-in", request.string(), "-CA", made.ca.string(),
                   "-CAkey", ca_key.string(), "-CAcreateserial", "-out", made.certificate.string(),
                   "-days", "2", "-extfile", extensions.string()},
                  log));
  return made;
}

Result<std::unique_ptr<NginxServer>> NginxServer::start(
    std::optional<std::filesystem::path> docroot_option, NginxOptions options) {
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
    std::string tls;
    if (options.tls) {
      // Sessions resumable by ID and by ticket, as cloud front ends do.
      tls = fmt::format(
          "    ssl_certificate {};\n    ssl_certificate_key {};\n"
          "    ssl_session_cache shared:lazyblock_tls:1m;\n    ssl_session_tickets on;\n",
          options.tls->certificate.string(), options.tls->key.string());
    }
    std::string proxy;
    if (!options.proxy_to.empty()) {
      // As a TLS front end passes requests on: the Host header (which
      // signatures cover) and the bodies as they come, unbuffered.
      proxy = fmt::format(
          "proxy_pass {}; proxy_set_header Host $http_host; proxy_http_version 1.1; "
          "proxy_request_buffering off; proxy_buffering off;",
          options.proxy_to);
    }
    replace_all(config, "{proxy}", proxy);
    replace_all(config, "{listen_options}", options.tls ? " ssl http2" : "");
    replace_all(config, "{tls}", tls);
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

    SpawnOptions spawn;
    spawn.own_process_group = true;  // the master and its workers
    Result<ChildProcess> child =
        ChildProcess::spawn({nginx, "-p", root.string() + "/", "-c", (root / "nginx.conf").string(),
                             "-e", (root / "error.log").string()},
                            spawn);
    if (!child) return child.status();
    // Ready once it accepts connections, or failed once it exits.
    if (child->wait_until(listens_on(*port), std::chrono::seconds(20))) {
      return std::unique_ptr<NginxServer>(new NginxServer(
          std::move(dir).value(), docroot, *port, std::move(*child), options.tls.has_value()));
    }
    child->kill_hard();
    last_failure = Status::io_error(
        fmt::format("nginx did not start on port {}: {}", *port, slurp(root / "error.log")));
    if (slurp(root / "error.log").find("Address already in use") == std::string::npos) break;
  }
  return last_failure;
}

NginxServer::NginxServer(ScratchDir dir, std::filesystem::path docroot, uint16_t port,
                         ChildProcess process, bool tls)
    : dir_(std::move(dir)),
      docroot_(std::move(docroot)),
      port_(port),
      process_(std::move(process)),
      tls_(tls) {}

NginxServer::~NginxServer() = default;

std::string NginxServer::url(std::string_view host) const {
  return fmt::format("{}://{}:{}", tls_ ? "https" : "http", host, port_);
}

std::string NginxServer::access_log() const { return slurp(dir_.path() / "access.log"); }

bool NginxServer::slow_request_arrived() const {
  return std::filesystem::exists(dir_.path() / "slow-arrived");
}

}  // namespace lazyblock::testing
