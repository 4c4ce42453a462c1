#include "storage/http_store.h"

#include <charconv>

#include <fmt/format.h>

namespace lazyblock {
namespace {

// Error bodies are read this far, for the message (an S3 <Code>, say).
constexpr size_t kErrorBodyLimit = 4096;

std::optional<uint64_t> parse_u64(std::string_view text) {
  uint64_t value = 0;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size() || text.empty()) return std::nullopt;
  return value;
}

// "bytes A-B/TOTAL" -> {A, B, TOTAL}; "bytes */TOTAL" -> {nullopt, nullopt, TOTAL}.
struct ContentRange {
  std::optional<uint64_t> first;
  std::optional<uint64_t> last;
  std::optional<uint64_t> total;
};

std::optional<ContentRange> parse_content_range(std::string_view text) {
  if (text.rfind("bytes ", 0) != 0) return std::nullopt;
  text.remove_prefix(6);
  const size_t slash = text.find('/');
  if (slash == std::string_view::npos) return std::nullopt;
  ContentRange range;
  range.total = parse_u64(text.substr(slash + 1));
  const std::string_view span = text.substr(0, slash);
  if (span == "*") return range;
  const size_t dash = span.find('-');
  if (dash == std::string_view::npos) return std::nullopt;
  range.first = parse_u64(span.substr(0, dash));
  range.last = parse_u64(span.substr(dash + 1));
  if (!range.first || !range.last || *range.last < *range.first) return std::nullopt;
  return range;
}

// The body of a response to a range request, never more than promised.
// Its errors name the store, the key and the range once ("WHERE: cause"),
// without HttpClient's request line, which would name the key again.
class HttpRangeReader final : public RangeReader {
 public:
  HttpRangeReader(std::unique_ptr<HttpResponse> response, HttpRequest request, std::string where,
                  uint64_t object_size, std::string version, uint64_t range_length)
      : response_(std::move(response)),
        request_(std::move(request)),
        where_(std::move(where)),
        object_size_(object_size),
        version_(std::move(version)),
        range_length_(range_length) {}

  Result<size_t> read(std::span<std::byte> buffer) override {
    if (response_ == nullptr) return size_t{0};
    Result<size_t> got = response_->read(buffer);
    if (!got) {
      return restated(got.status(),
                      where_ + ": " + without_request(got.status().message(), request_));
    }
    delivered_ += *got;
    if (delivered_ > range_length_) {
      return Status::corruption(
          fmt::format("{}: the response sent more than the {} bytes "
                      "promised",
                      where_, range_length_));
    }
    return got;
  }
  uint64_t object_size() const override { return object_size_; }
  std::string object_version() const override { return version_; }
  uint64_t range_length() const override { return range_length_; }

 private:
  const std::unique_ptr<HttpResponse> response_;  // null for an empty range
  const HttpRequest request_;
  const std::string where_;
  const uint64_t object_size_;
  const std::string version_;
  const uint64_t range_length_;
  uint64_t delivered_ = 0;
};

std::string error_excerpt(HttpResponse& response) {
  Result<std::string> body = response.read_all(kErrorBodyLimit);
  return body ? *body : std::string();
}

}  // namespace

Result<std::unique_ptr<RangeReader>> empty_range(ObjectStore& store, const std::string& key,
                                                 uint64_t offset, const IoContext& io) {
  Result<ObjectInfo> info = store.stat_info(key, io);
  if (!info) return info.status();
  if (offset > info->size) {
    return Status::out_of_range(fmt::format("{}: read {}: offset {} is past the end at {}",
                                            store.describe(), key, offset, info->size));
  }
  return std::unique_ptr<RangeReader>(
      new HttpRangeReader(nullptr, {}, {}, info->size, std::move(info->version), 0));
}

Result<ObjectInfo> info_from_head(Result<std::unique_ptr<HttpResponse>> response,
                                  const HttpRequest& request, const std::string& store,
                                  const std::string& key) {
  const std::string what = fmt::format("{}: stat {}", store, key);
  if (!response) {
    return restated(response.status(),
                    what + ": " + without_request(response.status().message(), request));
  }
  if ((*response)->status() != 200) {
    return http_failure((*response)->status(), store, "stat " + key, key, "");
  }
  const std::optional<std::string> length = (*response)->header("Content-Length");
  const std::optional<uint64_t> size = length ? parse_u64(*length) : std::nullopt;
  if (!size) return Status::corruption(what + ": the answer has no Content-Length");
  return ObjectInfo{*size, version_from_headers(**response)};
}

Status restated(const Status& status, std::string message) {
  switch (status.code()) {
    case StatusCode::kNotFound:
      return Status::not_found(std::move(message));
    case StatusCode::kInvalidArgument:
      return Status::invalid_argument(std::move(message));
    case StatusCode::kOutOfRange:
      return Status::out_of_range(std::move(message));
    case StatusCode::kCorruption:
      return Status::corruption(std::move(message));
    case StatusCode::kTimeout:
      return Status::timeout(std::move(message));
    case StatusCode::kCancelled:
      return Status::cancelled(std::move(message));
    case StatusCode::kUnavailable:
      return Status::unavailable(std::move(message));
    case StatusCode::kNoSpace:
      return Status::no_space(std::move(message));
    case StatusCode::kAlreadyExists:
      return Status::already_exists(std::move(message));
    case StatusCode::kOk:
    case StatusCode::kIoError:
      break;
  }
  return Status::io_error(std::move(message));
}

std::string without_request(const std::string& message, const HttpRequest& request) {
  const std::string prefix = request.method + " " + request.url + ": ";
  return message.rfind(prefix, 0) == 0 ? message.substr(prefix.size()) : message;
}

std::string version_from_headers(const HttpResponse& response) {
  // The strongest the store sends: a generation number names one write of
  // the object; an ETag names its content; a date may miss a quick rewrite.
  for (const char* name : {"x-goog-generation", "ETag", "Last-Modified"}) {
    if (std::optional<std::string> value = response.header(name)) {
      return fmt::format("{} {}", name, *value);
    }
  }
  return {};
}

std::string range_header(uint64_t offset, uint64_t length) {
  return fmt::format("bytes={}-{}", offset, offset + length - 1);
}

Status http_failure(long status, const std::string& store, const std::string& what,
                    const std::string& key, std::string_view body) {
  std::string detail = fmt::format("{}: {}: HTTP {}", store, what, status);
  // An S3-style error names its cause in <Code> and <Message>.
  if (const size_t code = body.find("<Code>"); code != std::string_view::npos) {
    const size_t end = body.find("</Code>", code);
    if (end != std::string_view::npos)
      detail += fmt::format(" {}", body.substr(code + 6, end - code - 6));
  }
  if (status == 404) {
    if (body.find("<Code>NoSuchBucket</Code>") != std::string_view::npos) {
      return Status::not_found(fmt::format("{}: {}: the bucket does not exist", store, what));
    }
    return Status::not_found(fmt::format("{}: object not found: {} (HTTP 404)", store, key));
  }
  if (status == 416) return Status::out_of_range(detail);
  // A request timeout and a throttle pass with time; other 4xx do not.
  if (status == 408 || status == 429 || status >= 500) return Status::unavailable(detail);
  if (status == 401 || status == 403) return Status::io_error(detail + " (access denied)");
  return Status::io_error(detail);
}

Result<std::unique_ptr<RangeReader>> range_reader(std::unique_ptr<HttpResponse> response,
                                                  HttpRequest request, const std::string& store,
                                                  const std::string& key, uint64_t offset,
                                                  uint64_t length) {
  const long status = response->status();
  const std::string read_what = fmt::format("read {} [{}, +{})", key, offset, length);
  const std::string what = store + ": " + read_what;
  // (A plain value and a flag: GCC 12 misjudges an optional here as
  // maybe-uninitialized.)
  bool has_length = false;
  uint64_t content_length = 0;
  if (const std::optional<std::string> header = response->header("Content-Length")) {
    if (const std::optional<uint64_t> value = parse_u64(*header)) {
      has_length = true;
      content_length = *value;
    }
  }
  if (status == 206) {
    const std::optional<std::string> header = response->header("Content-Range");
    const std::optional<ContentRange> range = header ? parse_content_range(*header) : std::nullopt;
    if (!range || !range->first || !range->total) {
      return Status::corruption(
          fmt::format("{}: a 206 answer without a usable Content-Range "
                      "('{}')",
                      what, header.value_or("")));
    }
    const uint64_t expected_end = std::min(offset + length, *range->total);
    if (*range->first != offset || *range->last + 1 != expected_end) {
      return Status::corruption(
          fmt::format("{}: the store answered with bytes [{}, {}] of {}, not the range asked", what,
                      *range->first, *range->last, *range->total));
    }
    const uint64_t range_length = *range->last + 1 - *range->first;
    if (has_length && content_length != range_length) {
      return Status::corruption(fmt::format("{}: Content-Length {} disagrees with Content-Range {}",
                                            what, content_length, *header));
    }
    std::string version = version_from_headers(*response);
    return std::unique_ptr<RangeReader>(new HttpRangeReader(std::move(response), std::move(request),
                                                            what, *range->total, std::move(version),
                                                            range_length));
  }
  if (status == 200) {
    // A server without range support sends the whole object: acceptable
    // only if the whole object is what was asked for.
    if (!has_length) {
      return Status::corruption(fmt::format("{}: a 200 answer without a Content-Length", what));
    }
    if (offset != 0 || content_length > length) {
      return Status::corruption(fmt::format(
          "{}: the store ignored the range and answered 200 with the whole object ({} bytes)", what,
          content_length));
    }
    std::string version = version_from_headers(*response);
    return std::unique_ptr<RangeReader>(new HttpRangeReader(std::move(response), std::move(request),
                                                            what, content_length,
                                                            std::move(version), content_length));
  }
  if (status == 416) {
    const std::optional<std::string> header = response->header("Content-Range");
    const std::optional<ContentRange> range = header ? parse_content_range(*header) : std::nullopt;
    if (range && range->total && offset == *range->total) {
      // A range starting exactly at the end is empty, not an error.
      return std::unique_ptr<RangeReader>(
          new HttpRangeReader(nullptr, {}, {}, *range->total, version_from_headers(*response), 0));
    }
    return Status::out_of_range(
        fmt::format("{}: the offset is past the object's end{}", what,
                    range && range->total ? fmt::format(" at {}", *range->total) : std::string()));
  }
  return http_failure(status, store, read_what, key, error_excerpt(*response));
}

Result<std::shared_ptr<HttpStore>> HttpStore::open(std::string base_url,
                                                   HttpClientOptions options) {
  if (base_url.rfind("http://", 0) != 0 && base_url.rfind("https://", 0) != 0) {
    return Status::invalid_argument(
        fmt::format("'{}' is not an http:// or https:// URL", base_url));
  }
  const size_t host_start = base_url.find("://") + 3;
  if (host_start >= base_url.size() || base_url[host_start] == '/') {
    return Status::invalid_argument(fmt::format("store URL {} names no host", base_url));
  }
  while (base_url.back() == '/') base_url.pop_back();
  return std::shared_ptr<HttpStore>(new HttpStore(std::move(base_url), options));
}

HttpStore::HttpStore(std::string base_url, HttpClientOptions options)
    : base_url_(std::move(base_url)), client_(options) {}

std::string HttpStore::url_of(const std::string& key) const {
  return base_url_ + "/" + url_encode_path(key);
}

Result<uint64_t> HttpStore::stat(const std::string& key, const IoContext& io) {
  Result<ObjectInfo> info = stat_info(key, io);
  if (!info) return info.status();
  return info->size;
}

Result<ObjectInfo> HttpStore::stat_info(const std::string& key, const IoContext& io) {
  HttpRequest request;
  request.method = "HEAD";
  request.url = url_of(key);
  return info_from_head(client_.send(request, io), request, describe(), key);
}

Result<std::unique_ptr<RangeReader>> HttpStore::open_range(const std::string& key, uint64_t offset,
                                                           uint64_t length, const IoContext& io) {
  if (length == 0) return empty_range(*this, key, offset, io);
  HttpRequest request;
  request.url = url_of(key);
  request.headers.emplace_back("Range", range_header(offset, length));
  Result<std::unique_ptr<HttpResponse>> response = client_.send(request, io);
  if (!response) {
    return restated(response.status(),
                    fmt::format("{}: read {} [{}, +{}): {}", describe(), key, offset, length,
                                without_request(response.status().message(), request)));
  }
  return range_reader(std::move(response).value(), std::move(request), describe(), key, offset,
                      length);
}

Status HttpStore::put(const std::string& key, std::span<const std::byte>, const IoContext&) {
  return Status::invalid_argument(fmt::format(
      "{}: put {}: http:// stores are read-only (write with file:// or s3://)", describe(), key));
}

Status HttpStore::remove(const std::string& key, const IoContext&) {
  return Status::invalid_argument(
      fmt::format("{}: remove {}: http:// stores are read-only (write with file:// or s3://)",
                  describe(), key));
}

}  // namespace lazyblock
