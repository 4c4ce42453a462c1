// S3Store: objects in an S3 bucket (AWS, or any S3-compatible server such as
// Ceph RGW, R2, MinIO) or a GCS bucket through its XML API, which speaks
// the same protocol. Key K is the object PREFIX/K of the bucket.
//
// Requests are signed with SigV4 (sigv4.h), or, for GCS with an OAuth token,
// carry it as a bearer token; without credentials they go anonymous (public
// buckets). What is signed is what is sent: the Host header is sent
// explicitly, as signed (curl would drop a default port, http://h:80 going
// out as `Host: h`), and keys or prefixes with "." or ".." segments are
// refused (kInvalidArgument), since curl, proxies and servers rewrite such
// paths (a/../b goes out as b), so they could not be addressed reliably, nor
// stored under the same key by the file:// store. Reads are range GETs
// checked as the http store checks them (http_store.h); writes of large
// objects use multipart upload, in parts of part_size. An upload that fails
// or is stopped (its IoContext's stop or deadline, honoured between parts
// and during each) is aborted, so that no parts are left behind; if even
// the abort fails, the error says which upload is left.
//
// Errors name the store (scheme, bucket, prefix and endpoint), the
// operation and the key once, keep S3's <Code> and <Message>, and say what
// to do where the cause is known: a wrong secret (SignatureDoesNotMatch:
// check AWS_SECRET_ACCESS_KEY), an unknown key id, a bucket in another
// region (named from S3's <Region> or x-amz-bucket-region: "set
// AWS_REGION=..."), a clock off by more than S3 allows
// (RequestTimeTooSkewed), a refused session token, a missing bucket ("bucket
// NAME does not exist", kNotFound, on reads and writes alike). HEAD answers
// carry no body, so a failed stat asks again with a one-byte GET to learn
// the cause. 404 is kNotFound ("object not found: KEY"), 416 kOutOfRange;
// 408, 429, 5xx and S3's RequestTimeout (a 400 for an idle connection) are
// kUnavailable, worth a retry; every other 4xx is kIoError, not retried.
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
#include <string_view>

#include "storage/http_client.h"
#include "storage/object_store.h"
#include "storage/sigv4.h"

namespace lazyblock {

struct S3Config {
  std::string scheme = "s3";  // "s3" or "gs", for messages
  std::string bucket;
  std::string prefix;    // without leading or trailing '/'
  std::string endpoint;  // "https://s3.us-east-1.amazonaws.com", no trailing '/'
  std::string region = "us-east-1";
  bool path_style = true;
  std::optional<SigV4Credentials> credentials;  // none: anonymous (or bearer)
  std::string bearer_token;
  // Objects larger than multipart_threshold go up in parts of part_size
  // (S3 wants at least 5 MiB for every part but the last).
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
  Status put(const std::string& key, std::span<const std::byte> data, const IoContext& io) override;
  Status remove(const std::string& key, const IoContext& io) override;
  // "s3://BUCKET/PREFIX (ENDPOINT)"
  std::string describe() const override;

 private:
  S3Store(S3Config config, HttpClientOptions options);

  // kInvalidArgument for a key with "." or ".." segments.
  Status check_key(const std::string& key) const;

  // A request for `key` (with `query`), signed; `body` is sent as is.
  HttpRequest request(const std::string& method, const std::string& key,
                      std::vector<std::pair<std::string, std::string>> query,
                      std::vector<std::pair<std::string, std::string>> headers,
                      std::span<const std::byte> body) const;

  // `request` failed before an answer came (connection, stall, deadline,
  // stop): its code, with the store and `what` ("read KEY ...") as context.
  Status transport_failure(std::string_view what, const HttpRequest& request,
                           const Status& failure) const;
  // The answer `response` (HTTP `status`, error body `body`, possibly
  // empty) to `what` on `key` failed: what S3 said, and what to do.
  Status answer_failure(std::string_view what, const std::string& key, const HttpResponse& response,
                        long status, std::string_view body) const;

  Status put_multipart(const std::string& key, std::span<const std::byte> data,
                       const IoContext& io);
  // Aborts the upload `upload_id` of `key` after `failure`, and returns
  // `failure`, saying so if the upload could not be aborted.
  Status abort_upload(const std::string& key, const std::string& upload_id, const Status& failure);

  const S3Config config_;
  HttpClient client_;
};

}  // namespace lazyblock
