// HttpClient: HTTP(S) requests over libcurl, with the response body read as
// a stream, for the http, s3 and gs stores.
//
// Data flow: send() starts a transfer on a handle of its own and returns once
// the response's status and headers are in; HttpResponse::read() then drives
// libcurl, which writes body bytes straight into the reader's buffer (one
// copy from libcurl's receive buffer, none in between). The transfer pauses
// once that buffer is full (TCP then holds the rest), so that libcurl does
// not go on receiving what would be copied twice; the rest of the receive
// in hand (or body bytes that come with the headers) goes to a small spill
// buffer that the next read drains first. A slow reader never makes the
// client buffer a whole chunk. Connections are kept
// alive: a transfer that ends cleanly returns its handles, connection and
// all, to a pool the next transfer takes from, so consecutive ranges of an
// object ride one connection. (libcurl's shared connection cache is not safe
// across threads, so connections are pooled with their handles instead; DNS
// and TLS sessions are shared.) HTTP/2 is used where a TLS server offers it.
// TLS peers are always verified, against the system's CAs or the bundle
// HttpClientOptions::ca_file names.
//
// Every wait honours the IoContext: kTimeout at the deadline, kCancelled on a
// stop (which wakes a blocked read at once). A connection that cannot be made
// within connect_timeout, or a response that sends no byte for
// stall_timeout, fails with kUnavailable, as do resets and other transport
// failures: a retry layer may try again. What another try cannot change
// fails with kIoError and says so: a host name that does not resolve, a
// certificate that is not trusted or does not name the host, a CA bundle
// that cannot be read. HTTP statuses are the caller's to judge.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "common/io_context.h"
#include "common/mutex.h"
#include "common/status.h"

namespace lazyblock {

struct HttpRequest {
  std::string method = "GET";  // GET, HEAD, PUT, POST, DELETE
  std::string url;
  std::vector<std::pair<std::string, std::string>> headers;
  std::span<const std::byte> body;  // sent as is (PUT, POST); must outlive send()'s response
};

class HttpResponse {
 public:
  virtual ~HttpResponse() = default;
  virtual long status() const = 0;
  // The last value of the header `name` (case-insensitive), if sent.
  virtual std::optional<std::string> header(std::string_view name) const = 0;
  // The next body bytes: at least one, or 0 at the end of the body, or an
  // error (a transport failure or stall as kUnavailable, a body shorter
  // than its Content-Length as kUnavailable too).
  virtual Result<size_t> read(std::span<std::byte> buffer) = 0;
  // The whole remaining body, failing (kCorruption) if it exceeds `limit`.
  Result<std::string> read_all(size_t limit);
};

struct HttpClientOptions {
  std::chrono::milliseconds connect_timeout{10000};
  std::chrono::milliseconds stall_timeout{30000};  // no byte for this long: kUnavailable
  // The CA certificates (PEM) that TLS peers are verified against instead
  // of the system's; empty for the system's.
  std::string ca_file;
};

class HttpClient {
 public:
  explicit HttpClient(HttpClientOptions options = {});
  ~HttpClient();
  HttpClient(const HttpClient&) = delete;
  HttpClient& operator=(const HttpClient&) = delete;

  // Sends `request`; returns once the response's headers have arrived.
  Result<std::unique_ptr<HttpResponse>> send(const HttpRequest& request, const IoContext& io);

  const HttpClientOptions& options() const { return options_; }

 private:
  class Transfer;
  struct Share;
  // An easy handle on a multi handle of its own (the multi handle holds the
  // connection, so a pair reused keeps its connection alive), and the spill
  // buffer its transfers use, allocated once.
  struct Connection;
  std::unique_ptr<Connection> acquire();
  // Back to the pool if `reusable` (the transfer ended cleanly), else closed.
  void release(std::unique_ptr<Connection> connection, bool reusable);

  const HttpClientOptions options_;
  std::unique_ptr<Share> share_;  // DNS and TLS sessions shared by transfers
  Mutex pool_mu_;
  std::vector<std::unique_ptr<Connection>> idle_ GUARDED_BY(pool_mu_);  // the most recent last
};

// Percent-encodes `text` for a URL path: unreserved characters and '/' stay.
std::string url_encode_path(std::string_view text);

}  // namespace lazyblock
