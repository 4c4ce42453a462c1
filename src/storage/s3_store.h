// S3Store: objects in an S3 bucket (AWS, or any S3-compatible server such as
// Ceph RGW, R2, MinIO) or a GCS bucket through its XML API, which speaks
// the same protocol. Key K is the object PREFIX/K of the bucket.
//
// Requests are signed with SigV4 (sigv4.h), or, for GCS with an OAuth token,
// carry it as a bearer token; without credentials they go anonymous (public
// buckets). Reads are range GETs checked as the http store checks them
// (http_store.h); writes of large objects use multipart upload, in parts of
// part_size, aborted if any part fails.
//
// Configuration comes from the environment, as AWS's own tools read it:
//   s3://BUCKET[/PREFIX]  AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL (default
//                         https://s3.REGION.amazonaws.com), AWS_REGION or
//                         AWS_DEFAULT_REGION (default us-east-1),
//                         AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
//                         AWS_SESSION_TOKEN. Addressing is virtual-hosted on
//                         AWS and path-style on a custom endpoint;
//                         LAZYBLOCK_S3_ADDRESSING=path|virtual overrides.
//   gs://BUCKET[/PREFIX]  GCS_ENDPOINT_URL (default
//                         https://storage.googleapis.com), path-style;
//                         GOOGLE_OAUTH_ACCESS_TOKEN as a bearer token if set,
//                         else HMAC interoperability keys in
//                         AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "storage/http_client.h"
#include "storage/object_store.h"
#include "storage/sigv4.h"

namespace lazyblock {

struct S3Config {
  std::string scheme = "s3";  // "s3" or "gs", for messages
  std::string bucket;
  std::string prefix;         // without leading or trailing '/'
  std::string endpoint;       // "https://s3.us-east-1.amazonaws.com", no trailing '/'
  std::string region = "us-east-1";
  bool path_style = true;
  std::optional<SigV4Credentials> credentials;  // none: anonymous (or bearer)
  std::string bearer_token;
  uint64_t part_size = 16ULL * 1024 * 1024;
  uint64_t multipart_threshold = 32ULL * 1024 * 1024;

  // The configuration for an s3:// or gs:// URL, from the environment.
  static Result<S3Config> from_url(const std::string& url);
};

class S3Store final : public ObjectStore {
 public:
  static Result<std::shared_ptr<S3Store>> open(S3Config config, HttpClientOptions options = {});

  Result<uint64_t> stat(const std::string& key, const IoContext& io) override;
  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;
  Status put(const std::string& key, std::span<const std::byte> data,
             const IoContext& io) override;
  Status remove(const std::string& key, const IoContext& io) override;
  std::string describe() const override;

 private:
  S3Store(S3Config config, HttpClientOptions options);

  // A request for `key` (with `query`), signed; `body` is sent as is.
  HttpRequest request(const std::string& method, const std::string& key,
                      std::vector<std::pair<std::string, std::string>> query,
                      std::vector<std::pair<std::string, std::string>> headers,
                      std::span<const std::byte> body) const;
  Status put_multipart(const std::string& key, std::span<const std::byte> data,
                       const IoContext& io);

  const S3Config config_;
  HttpClient client_;
};

}  // namespace lazyblock
