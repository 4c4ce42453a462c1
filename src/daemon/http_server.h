// HttpServer: the daemon's HTTP/1.1 front, a thin adapter over libmicrohttpd.
//
// Data flow: libmicrohttpd accepts on a listening socket the daemon made
// (UnixListener's rules for the API socket: mode 0600, a live socket never
// replaced, only our own file removed), parses each request, and hands its
// method, path and body (collected here, at most kMaxBody bytes: a longer
// one is read and dropped, and the request marked) to the handler, on a
// thread per connection, at most `max_connections` of them. The handler's
// Response is sent as it is. No HTTP parsing happens in lazyblock's own code.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "common/status.h"

struct MHD_Daemon;

namespace lazyblock::daemon {

// Bodies larger than this are refused (400) without being kept.
inline constexpr size_t kMaxBody = 1024 * 1024;

struct HttpRequest {
  std::string method;  // "GET", "PUT", ...
  std::string path;    // "/disks/vm1", without the query
  std::string body;
  bool body_too_large = false;  // more than kMaxBody bytes came: `body` is empty
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
};

using HttpHandler = std::function<HttpResponse(const HttpRequest&)>;

class HttpServer {
 public:
  // Serves on `listen_fd` (listening already, owned by the caller, who
  // closes it only after this server is gone). `what` names it in logs.
  static Result<std::unique_ptr<HttpServer>> start(int listen_fd, HttpHandler handler,
                                                   std::string what, unsigned max_connections = 64);
  // stop(), if not yet.
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  // Takes no new connection, ends those open (their handlers run to their
  // end first) and joins the server's threads. Idempotent; not to be called
  // from a handler.
  void stop();

  // What libmicrohttpd's callbacks reach (http_server.cc).
  struct Context;

 private:
  explicit HttpServer(std::unique_ptr<Context> context);

  std::unique_ptr<Context> context_;
  MHD_Daemon* daemon_ = nullptr;
};

}  // namespace lazyblock::daemon
