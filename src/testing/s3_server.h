// S3Server: a real S3-API server on loopback for the tests: s3rver (pinned
// in tests/s3rver, installed by scripts/install-deps) behind lazyblock's own
// front, tests/s3rver/sigv4_front.js, in one Node.js process with a fresh
// data directory and the buckets asked for.
//
// s3rver itself verifies no SigV4 signature; the front does, with AWS's own
// signer, and answers as S3 does when a request fails: SignatureDoesNotMatch
// for a wrong secret, InvalidAccessKeyId for an unknown key,
// RequestTimeTooSkewed past 15 minutes of clock difference,
// AuthorizationHeaderMalformed naming the server's region for a request
// signed for another, InvalidToken for a wrong session token. Anonymous
// requests are refused (AccessDenied) unless Options::anonymous_reads lets
// GETs and HEADs through. The front also implements AbortMultipartUpload,
// which s3rver lacks. endpoint() is the front's.
//
// Stopped, and its process reaped, when the object goes away, even if a
// test fails.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "testing/child_process.h"
#include "testing/scratch_dir.h"

namespace lazyblock::testing {

// How a test's S3 server behaves.
struct S3ServerOptions {
  std::string region = "us-east-1";
  // Non-empty: every request must carry this x-amz-security-token.
  std::string session_token;
  // The server's clock runs this far ahead of the machine's.
  std::chrono::seconds clock_skew{0};
  // GET and HEAD without credentials are served, as by a public bucket.
  bool anonymous_reads = false;
  // Where the front listens; port 0 is any free port.
  std::string address = "127.0.0.1";
  uint16_t port = 0;
  // Part N (from 1) of every multipart upload fails with 500
  // InternalError, or is received and never answered. 0: none.
  int fail_part = 0;
  int stall_part = 0;
};

class S3Server {
 public:
  static constexpr const char* kAccessKeyId = "S3RVER";
  static constexpr const char* kSecretAccessKey = "S3RVER";

  using Options = S3ServerOptions;

  // A multipart upload the server holds (started, neither completed nor
  // aborted), as s3rver keeps it on disk.
  struct Upload {
    std::string id;
    std::string key;
    int parts = 0;  // parts received
  };

  // Fails with a message saying what to run if node or s3rver is missing,
  // kUnavailable if the address and port cannot be had.
  static Result<std::unique_ptr<S3Server>> start(const std::vector<std::string>& buckets,
                                                 Options options = {});
  ~S3Server();
  S3Server(const S3Server&) = delete;
  S3Server& operator=(const S3Server&) = delete;

  // "http://ADDRESS:PORT" (the front)
  std::string endpoint() const;
  uint16_t port() const { return port_; }

  // The multipart uploads in progress in `bucket`.
  std::vector<Upload> uploads(const std::string& bucket) const;

  // What the front has answered so far, one "METHOD TARGET STATUS [CODE]"
  // line a request ("held" for a stalled part).
  std::vector<std::string> requests() const;

 private:
  S3Server(ScratchDir dir, std::string address, uint16_t port, ChildProcess process)
      : dir_(std::move(dir)),
        address_(std::move(address)),
        port_(port),
        process_(std::move(process)) {}

  ScratchDir dir_;
  std::string address_;
  uint16_t port_;
  ChildProcess process_;  // stopped before dir_ goes
};

}  // namespace lazyblock::testing
