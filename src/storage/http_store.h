// HttpStore: objects served by any HTTP(S) server that answers range
// requests (a static server, a CDN, presigned URLs): key K is at
// BASE_URL/K. Read-only.
//
// open_range sends `Range: bytes=A-B` and checks the answer before a byte
// is trusted: a 206 whose Content-Range is not the range asked (clipped at
// the object's end) or whose Content-Length disagrees with it, a 200 with
// the whole object when the request was for less, or a body longer than
// promised, are kCorruption; a body shorter than promised ends the stream
// early (the retry layer resumes it). Every error names the store, the key
// and the range once: "BASE_URL: read KEY [OFFSET, +LENGTH): cause". The object's size
// comes from Content-Range, so no HEAD is needed; its version (ObjectInfo)
// from the same answer: x-goog-generation if sent, else the ETag, else
// Last-Modified. Statuses: 404 kNotFound
// ("BASE_URL: object not found: KEY"), 416 kOutOfRange, 408, 429 and 5xx
// kUnavailable (worth a retry), 401/403 and the rest kIoError.
#pragma once

#include <memory>
#include <string>

#include "storage/http_client.h"
#include "storage/object_store.h"

namespace lazyblock {

class HttpStore final : public ObjectStore {
 public:
  // `base_url`: "http(s)://HOST[:PORT][/PREFIX]".
  static Result<std::shared_ptr<HttpStore>> open(std::string base_url,
                                                 HttpClientOptions options = {});

  Result<uint64_t> stat(const std::string& key, const IoContext& io) override;
  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;
  bool read_only() const override { return true; }
  Status put(const std::string& key, std::span<const std::byte> data, const IoContext& io) override;
  Status remove(const std::string& key, const IoContext& io) override;
  std::string describe() const override { return base_url_; }

 private:
  explicit HttpStore(std::string base_url, HttpClientOptions options);
  std::string url_of(const std::string& key) const;

  const std::string base_url_;  // without a trailing '/'
  HttpClient client_;
};

// Shared with the S3 and GCS stores, which speak the same HTTP. `store` is
// the store's describe(), which every message starts with.

// The Status for a response with a failing HTTP status to the operation
// `what` ("stat KEY"); `body` (possibly empty) is an excerpt of the
// response's body, for the message.
Status http_failure(long status, const std::string& store, const std::string& what,
                    const std::string& key, std::string_view body);

// Checks the response to `request`, a GET of [offset, offset + length) of
// `key`, and wraps its body as a RangeReader (see HttpStore above).
// `length` > 0.
Result<std::unique_ptr<RangeReader>> range_reader(std::unique_ptr<HttpResponse> response,
                                                  HttpRequest request, const std::string& store,
                                                  const std::string& key, uint64_t offset,
                                                  uint64_t length);

// `status` with `message` in place of its own (its code kept).
Status restated(const Status& status, std::string message);

// `message` of a failure of `request` without HttpClient's leading
// "METHOD URL: ": a store's own context names the object instead (the URL
// would name the key twice).
std::string without_request(const std::string& message, const HttpRequest& request);

// open_range of a length-0 range: an empty reader carrying the object's
// size and version (from `store`'s stat_info), or kOutOfRange if `offset` is
// past the end.
Result<std::unique_ptr<RangeReader>> empty_range(ObjectStore& store, const std::string& key,
                                                 uint64_t offset, const IoContext& io);

// The object's size and version from the answer to `request`, a HEAD of
// `key`.
Result<ObjectInfo> info_from_head(Result<std::unique_ptr<HttpResponse>> response,
                                  const HttpRequest& request, const std::string& store,
                                  const std::string& key);

// The object's version from a response's headers (see HttpStore); "" if
// they carry none.
std::string version_from_headers(const HttpResponse& response);

// "bytes=A-B" for [offset, offset + length), length > 0.
std::string range_header(uint64_t offset, uint64_t length);

}  // namespace lazyblock
