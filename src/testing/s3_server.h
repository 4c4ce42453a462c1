// S3Server: a real S3-API server (s3rver, pinned in tests/s3rver and
// installed by scripts/install-deps) on 127.0.0.1 at a port chosen at run
// time, with a fresh data directory and the buckets asked for. It checks
// SigV4 signatures made with its credentials (S3RVER / S3RVER) and accepts
// anonymous requests. Stopped, and its process reaped, when the object goes
// away, even if a test fails.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "testing/scratch_dir.h"

namespace lazyblock::testing {

class S3Server {
 public:
  static constexpr const char* kAccessKeyId = "S3RVER";
  static constexpr const char* kSecretAccessKey = "S3RVER";

  // Fails with a message saying what to run if node or s3rver is missing.
  static Result<std::unique_ptr<S3Server>> start(const std::vector<std::string>& buckets);
  ~S3Server();
  S3Server(const S3Server&) = delete;
  S3Server& operator=(const S3Server&) = delete;

  // "http://127.0.0.1:PORT"
  std::string endpoint() const;
  uint16_t port() const { return port_; }

 private:
  S3Server(ScratchDir dir, uint16_t port, pid_t pid)
      : dir_(std::move(dir)), port_(port), pid_(pid) {}

  ScratchDir dir_;
  uint16_t port_;
  pid_t pid_;
};

}  // namespace lazyblock::testing
