// NginxServer: a real nginx (Debian's, with its lua module) on 127.0.0.1 at
// a port chosen at run time, for the tests and benchmarks that talk HTTP.
//
// It serves files under docroot() with range requests as a static server or
// CDN does, and under a few prefixes behaves as remote stores do when they
// misbehave or are far away (see the locations in nginx_server.cc):
//   /shaped/KEY?ttfb_ms=20&mbps=100  first byte after ttfb_ms, then the body
//                                    paced at mbps (MB/s) per response
//   /full/KEY                        ignores Range: 200 with the whole object
//   /truncated/KEY                   sends half the promised body, then closes
//   /wrong-range/KEY                 a Content-Range one byte off the request
//   /status/503/KEY, /status/403/KEY, /status/500/KEY  that status
//   /failing-for/SECONDS/KEY         500 for SECONDS from the first request for
//                                    KEY there, then KEY as / serves it
//   /stall/KEY                       the first 64 KiB, then nothing for 60 s
//   /slow/KEY                        nothing for 60 s, then the response
// Every response carries X-Connection-Requests (requests served so far on
// its connection), to show keep-alive at work. With NginxOptions::tls it
// serves https (and HTTP/2 to clients that ask for it by ALPN) with a
// certificate a test made (TestCertificates). The server is stopped, and
// its process reaped, when the object goes away, even if a test fails.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"
#include "testing/child_process.h"
#include "testing/scratch_dir.h"

namespace lazyblock::testing {

// A CA and a server certificate it signed, made with the openssl command in
// `dir`: what a TLS test's server presents and its client trusts.
struct TestCertificates {
  std::filesystem::path ca;           // the CA's certificate (PEM)
  std::filesystem::path certificate;  // the server's, naming `names`
  std::filesystem::path key;          // the server's private key
  // `names`: host names and IP addresses the certificate is valid for.
  static Result<TestCertificates> make(const std::filesystem::path& dir,
                                       const std::vector<std::string>& names);
};

struct NginxOptions {
  std::optional<TestCertificates> tls;  // serve https with these
  // If set ("http://127.0.0.1:PORT"), requests outside the prefixes above
  // are passed to this server (a TLS front end for an S3 server, say).
  std::string proxy_to;
};

class NginxServer {
 public:
  // Starts nginx serving `docroot` (default: a fresh directory of its own);
  // fails with a message saying what to install if nginx or its lua module
  // is missing.
  static Result<std::unique_ptr<NginxServer>> start(
      std::optional<std::filesystem::path> docroot = std::nullopt, NginxOptions options = {});
  ~NginxServer();
  NginxServer(const NginxServer&) = delete;
  NginxServer& operator=(const NginxServer&) = delete;

  // Where the served files go (readable by nginx).
  const std::filesystem::path& docroot() const { return docroot_; }
  uint16_t port() const { return port_; }
  // "http://127.0.0.1:PORT" ("https://" with TLS), or with another name
  // for this host.
  std::string url(std::string_view host = "127.0.0.1") const;
  // Lines of the access log so far: "CONNECTION METHOD URI STATUS BYTES_SENT
  // CONNECTION_REQUESTS SESSION_REUSED PROTOCOL" (SESSION_REUSED: "r" for a
  // TLS session resumed, "." for a full handshake, "-" without TLS;
  // PROTOCOL: "HTTP/1.1", "HTTP/2.0").
  std::string access_log() const;
  // Whether a request has reached /slow/ (and sleeps there).
  bool slow_request_arrived() const;

 private:
  NginxServer(ScratchDir dir, std::filesystem::path docroot, uint16_t port, ChildProcess process,
              bool tls);

  ScratchDir dir_;
  std::filesystem::path docroot_;
  uint16_t port_;
  ChildProcess process_;  // stopped before dir_ goes
  bool tls_;
};

}  // namespace lazyblock::testing
