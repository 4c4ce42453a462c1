#include "daemon/http_server.h"

#include <microhttpd.h>

#include <chrono>
#include <cstdarg>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

#include "common/log.h"
#include "common/mutex.h"

namespace lazyblock::daemon {

struct HttpServer::Context {
  HttpHandler handler;
  std::string what;
  // Requests begun (headers read) and not yet completed (answer sent, or
  // the connection gone): stop() lets them end before it closes connections.
  Mutex mu;
  CondVar ended;
  size_t in_progress GUARDED_BY(mu) = 0;
};

namespace {

// How long stop() waits for calls in progress to be answered.
constexpr std::chrono::seconds kAnswerGrace{5};

// One request's state between libmicrohttpd's calls of the access handler:
// the body arrives in pieces before the last call.
struct Pending {
  HttpRequest request;
};

MHD_Result queue(MHD_Connection* connection, const HttpResponse& response) {
  MHD_Response* reply = MHD_create_response_from_buffer(
      response.body.size(), const_cast<char*>(response.body.data()), MHD_RESPMEM_MUST_COPY);
  if (reply == nullptr) return MHD_NO;
  if (!response.body.empty() || response.status != 204) {
    MHD_add_response_header(reply, MHD_HTTP_HEADER_CONTENT_TYPE, response.content_type.c_str());
  }
  const MHD_Result queued =
      MHD_queue_response(connection, static_cast<unsigned>(response.status), reply);
  MHD_destroy_response(reply);
  return queued;
}

MHD_Result on_request(void* cls, MHD_Connection* connection, const char* url, const char* method,
                      const char* /*version*/, const char* upload_data, size_t* upload_data_size,
                      void** state) {
  auto* context = static_cast<HttpServer::Context*>(cls);
  if (*state == nullptr) {  // the headers: the body (if any) comes in later calls
    auto* pending = new Pending;
    {
      MutexLock lock(context->mu);
      ++context->in_progress;
    }
    pending->request.method = method;
    pending->request.path = url;
    *state = pending;
    return MHD_YES;
  }
  auto* pending = static_cast<Pending*>(*state);
  if (*upload_data_size != 0) {
    HttpRequest& request = pending->request;
    if (!request.body_too_large && request.body.size() + *upload_data_size <= kMaxBody) {
      request.body.append(upload_data, *upload_data_size);
    } else {
      // Read to its end and dropped, so that the client hears why.
      request.body_too_large = true;
      request.body.clear();
      request.body.shrink_to_fit();
    }
    *upload_data_size = 0;
    return MHD_YES;
  }
  const HttpResponse response = context->handler(pending->request);
  return queue(connection, response);
}

void on_completed(void* cls, MHD_Connection* /*connection*/, void** state,
                  MHD_RequestTerminationCode /*why*/) {
  if (*state == nullptr) return;
  delete static_cast<Pending*>(*state);
  *state = nullptr;
  auto* context = static_cast<HttpServer::Context*>(cls);
  MutexLock lock(context->mu);
  if (--context->in_progress == 0) context->ended.notify_all();
}

void on_library_error(void* cls, const char* format, va_list arguments) {
  char line[512];
  std::vsnprintf(line, sizeof line, format, arguments);
  size_t length = std::strlen(line);
  while (length > 0 && line[length - 1] == '\n') line[--length] = '\0';
  log(LogLevel::kWarn, "{}: {}", *static_cast<const std::string*>(cls), line);
}

}  // namespace

HttpServer::HttpServer(std::unique_ptr<Context> context) : context_(std::move(context)) {}

Result<std::unique_ptr<HttpServer>> HttpServer::start(int listen_fd, HttpHandler handler,
                                                      std::string what, unsigned max_connections) {
  auto context = std::make_unique<Context>();
  context->handler = std::move(handler);
  context->what = std::move(what);
  std::unique_ptr<HttpServer> server(new HttpServer(std::move(context)));
  Context* raw = server->context_.get();
  // A thread per connection (bounded), so that a handler that waits on the
  // store (loading a header) holds up nobody else's call; ITC so that the
  // socket can be handed back (quiesced) before the daemon stops.
  server->daemon_ = MHD_start_daemon(
      MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL | MHD_USE_ITC |
          MHD_USE_ERROR_LOG,
      0, nullptr, nullptr, &on_request, raw, MHD_OPTION_EXTERNAL_LOGGER, &on_library_error,
      &raw->what, MHD_OPTION_LISTEN_SOCKET, listen_fd, MHD_OPTION_CONNECTION_LIMIT, max_connections,
      MHD_OPTION_CONNECTION_TIMEOUT, static_cast<unsigned>(30), MHD_OPTION_NOTIFY_COMPLETED,
      &on_completed, raw, MHD_OPTION_END);
  if (server->daemon_ == nullptr) {
    return Status::io_error(fmt::format("{}: the HTTP server did not start", raw->what));
  }
  return server;
}

HttpServer::~HttpServer() { stop(); }

void HttpServer::stop() {
  if (daemon_ == nullptr) return;
  // The listening socket is the caller's: quiesced, libmicrohttpd does not
  // close it.
  MHD_quiesce_daemon(daemon_);
  // Calls in progress get their answers; a client that does not read its
  // answer is not waited for long.
  {
    MutexLock lock(context_->mu);
    context_->ended.wait_for(lock, kAnswerGrace,
                             [&]() REQUIRES(context_->mu) { return context_->in_progress == 0; });
  }
  MHD_stop_daemon(daemon_);
  daemon_ = nullptr;
}

}  // namespace lazyblock::daemon
