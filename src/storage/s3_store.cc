#include "storage/s3_store.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <ctime>

#include <fmt/format.h>

#include "common/log.h"
#include "storage/http_store.h"

namespace lazyblock {
namespace {

constexpr size_t kResponseLimit = 1024 * 1024;  // XML answers are small
// Error bodies are read this far: S3's SignatureDoesNotMatch carries the
// string to sign and the canonical request, a few KiB.
constexpr size_t kErrorBodyLimit = 64 * 1024;
// An abort gets a deadline of its own, not the failed put's: it runs after a
// stop or a deadline too, and must neither be skipped nor hang.
constexpr std::chrono::seconds kAbortDeadline{30};

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : "";
}

// The text between <tag> and </tag>, if any, with XML's escapes undone.
std::optional<std::string> xml_value(std::string_view xml, std::string_view tag) {
  const std::string open = fmt::format("<{}>", tag);
  const std::string close = fmt::format("</{}>", tag);
  const size_t begin = xml.find(open);
  if (begin == std::string_view::npos) return std::nullopt;
  const size_t end = xml.find(close, begin + open.size());
  if (end == std::string_view::npos) return std::nullopt;
  const std::string_view raw = xml.substr(begin + open.size(), end - begin - open.size());
  std::string text;
  for (size_t i = 0; i < raw.size(); ++i) {
    const size_t semicolon = raw[i] == '&' ? raw.find(';', i) : std::string_view::npos;
    if (semicolon == std::string_view::npos) {
      text.push_back(raw[i]);
      continue;
    }
    const std::string_view entity = raw.substr(i + 1, semicolon - i - 1);
    unsigned code = 0;
    if (entity == "amp")
      code = '&';
    else if (entity == "lt")
      code = '<';
    else if (entity == "gt")
      code = '>';
    else if (entity == "quot")
      code = '"';
    else if (entity == "apos")
      code = '\'';
    else if (entity.size() > 1 && entity[0] == '#' && entity[1] != 'x') {
      std::from_chars(entity.data() + 1, entity.data() + entity.size(), code);
    }
    if (code == 0 || code > 0x7f) {
      text.push_back(raw[i]);  // left as written
      continue;
    }
    text.push_back(static_cast<char>(code));
    i = semicolon;
  }
  return text;
}

// The authority ("host[:port]") of a URL.
std::string authority(std::string_view url) {
  const size_t start = url.find("://");
  url.remove_prefix(start == std::string_view::npos ? 0 : start + 3);
  return std::string(url.substr(0, url.find('/')));
}

std::string_view scheme_of(std::string_view url) { return url.substr(0, url.find("://")); }

// Whether a '/'-separated path has a "." or ".." segment.
bool has_dot_segment(std::string_view path) {
  for (;;) {
    const size_t slash = path.find('/');
    const std::string_view segment = path.substr(0, slash);
    if (segment == "." || segment == "..") return true;
    if (slash == std::string_view::npos) return false;
    path.remove_prefix(slash + 1);
  }
}

// Seconds since the epoch of a time S3 writes as "20261201T213000Z" or
// "2026-12-01T21:50:00Z" (its first 14 digits), if it is one.
std::optional<int64_t> utc_seconds(std::string_view text) {
  std::string digits;
  for (const char c : text) {
    if (c >= '0' && c <= '9') digits.push_back(c);
    if (digits.size() == 14) break;
  }
  if (digits.size() != 14) return std::nullopt;
  const auto number = [&](size_t at, size_t size) { return std::stoi(digits.substr(at, size)); };
  std::tm utc{};
  utc.tm_year = number(0, 4) - 1900;
  utc.tm_mon = number(4, 2) - 1;
  utc.tm_mday = number(6, 2);
  utc.tm_hour = number(8, 2);
  utc.tm_min = number(10, 2);
  utc.tm_sec = number(12, 2);
  return static_cast<int64_t>(::timegm(&utc));
}

}  // namespace

Result<S3Config> S3Config::from_url(const std::string& url) {
  S3Config config;
  const size_t colon = url.find("://");
  config.scheme = colon == std::string::npos ? "" : url.substr(0, colon);
  if (config.scheme != "s3" && config.scheme != "gs") {
    return Status::invalid_argument(fmt::format("'{}' is not an s3:// or gs:// URL", url));
  }
  std::string path = url.substr(colon + 3);
  const size_t slash = path.find('/');
  config.bucket = path.substr(0, slash);
  if (slash != std::string::npos) config.prefix = path.substr(slash + 1);
  while (!config.prefix.empty() && config.prefix.back() == '/') config.prefix.pop_back();
  if (config.bucket.empty()) {
    return Status::invalid_argument(fmt::format("store URL {} names no bucket", url));
  }
  const std::string key_id = env("AWS_ACCESS_KEY_ID");
  const std::string secret = env("AWS_SECRET_ACCESS_KEY");
  if (key_id.empty() != secret.empty()) {
    return Status::invalid_argument(
        "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together");
  }
  if (!key_id.empty())
    config.credentials = SigV4Credentials{key_id, secret, env("AWS_SESSION_TOKEN")};

  if (config.scheme == "gs") {
    config.endpoint = env("GCS_ENDPOINT_URL");
    if (config.endpoint.empty()) config.endpoint = "https://storage.googleapis.com";
    config.region = "auto";
    config.bearer_token = env("GOOGLE_OAUTH_ACCESS_TOKEN");
    config.path_style = true;
  } else {
    config.region = env("AWS_REGION");
    if (config.region.empty()) config.region = env("AWS_DEFAULT_REGION");
    if (config.region.empty()) config.region = "us-east-1";
    config.endpoint = env("AWS_ENDPOINT_URL_S3");
    if (config.endpoint.empty()) config.endpoint = env("AWS_ENDPOINT_URL");
    config.path_style = !config.endpoint.empty();
    if (config.endpoint.empty()) {
      config.endpoint = fmt::format("https://s3.{}.amazonaws.com", config.region);
    }
    const std::string addressing = env("LAZYBLOCK_S3_ADDRESSING");
    if (addressing == "path") {
      config.path_style = true;
    } else if (addressing == "virtual") {
      config.path_style = false;
    } else if (!addressing.empty()) {
      return Status::invalid_argument(
          fmt::format("LAZYBLOCK_S3_ADDRESSING is '{}' (expected path or virtual)", addressing));
    }
  }
  while (!config.endpoint.empty() && config.endpoint.back() == '/') config.endpoint.pop_back();
  if (config.endpoint.rfind("http://", 0) != 0 && config.endpoint.rfind("https://", 0) != 0) {
    return Status::invalid_argument(
        fmt::format("endpoint '{}' is not an http:// or https:// URL", config.endpoint));
  }
  return config;
}

Result<std::shared_ptr<S3Store>> S3Store::open(S3Config config, HttpClientOptions options) {
  if (config.part_size < 5 * 1024 * 1024 || config.multipart_threshold < config.part_size) {
    return Status::invalid_argument("multipart parts must be at least 5 MiB");
  }
  if (has_dot_segment(config.prefix)) {
    return Status::invalid_argument(fmt::format(
        "{}://{}/{}: the prefix '{}' has a '.' or '..' segment, which HTTP clients and servers "
        "rewrite: name the prefix without one",
        config.scheme, config.bucket, config.prefix, config.prefix));
  }
  return std::shared_ptr<S3Store>(new S3Store(std::move(config), options));
}

S3Store::S3Store(S3Config config, HttpClientOptions options)
    : config_(std::move(config)), client_(options) {}

std::string S3Store::describe() const {
  return fmt::format("{}://{}{}{} ({})", config_.scheme, config_.bucket,
                     config_.prefix.empty() ? "" : "/", config_.prefix, config_.endpoint);
}

Status S3Store::check_key(const std::string& key) const {
  if (!has_dot_segment(key)) return Status::ok();
  return Status::invalid_argument(fmt::format(
      "{}: the key '{}' has a '.' or '..' segment: refused, since HTTP clients and servers "
      "rewrite such paths (a/../b is sent as b)",
      describe(), key));
}

HttpRequest S3Store::request(const std::string& method, const std::string& key,
                             std::vector<std::pair<std::string, std::string>> query,
                             std::vector<std::pair<std::string, std::string>> headers,
                             std::span<const std::byte> body) const {
  const std::string object = config_.prefix.empty() ? key : config_.prefix + "/" + key;
  std::string host = authority(config_.endpoint);
  std::string path = "/" + uri_encode(object, true);
  if (config_.path_style) {
    path = "/" + config_.bucket + path;
  } else {
    host = config_.bucket + "." + host;
  }
  HttpRequest out;
  out.method = method;
  out.url = fmt::format("{}://{}{}", scheme_of(config_.endpoint), host, path);
  const std::string query_string = canonical_query(query);
  if (!query_string.empty()) out.url += "?" + query_string;
  out.body = body;
  // Sent exactly as signed: left to curl, the Host header would lose a
  // default port the endpoint names (http://h:80 goes out as "Host: h").
  headers.emplace_back("Host", host);
  if (!config_.bearer_token.empty()) {
    headers.emplace_back("Authorization", "Bearer " + config_.bearer_token);
  } else if (config_.credentials) {
    const std::string payload = sha256_hex(body);
    const std::string date = amz_date(std::chrono::system_clock::now());
    headers.emplace_back("x-amz-date", date);
    headers.emplace_back("x-amz-content-sha256", payload);
    if (!config_.credentials->session_token.empty()) {
      headers.emplace_back("x-amz-security-token", config_.credentials->session_token);
    }
    SigV4Request signing;
    signing.method = method;
    signing.canonical_uri = path;
    signing.query = query;
    signing.headers = headers;
    signing.payload_sha256 = payload;
    headers.emplace_back(
        "Authorization",
        sigv4_sign(signing, *config_.credentials, config_.region, "s3", date).authorization);
  }
  const bool typed = std::any_of(headers.begin(), headers.end(),
                                 [](const auto& header) { return header.first == "Content-Type"; });
  if (method == "POST" && !typed) {
    // curl types every POST as a form unless told otherwise, and S3 keeps
    // the type of an upload's start as the object's; an empty value makes
    // curl send none (and is not signed, since it is not sent).
    headers.emplace_back("Content-Type", "");
  }
  out.headers = std::move(headers);
  return out;
}

Status S3Store::transport_failure(std::string_view what, const HttpRequest& request,
                                  const Status& failure) const {
  return restated(failure, fmt::format("{}: {}: {}", describe(), what,
                                       without_request(failure.message(), request)));
}

Status S3Store::answer_failure(std::string_view what, const std::string& key,
                               const HttpResponse& response, long status,
                               std::string_view body) const {
  const std::optional<std::string> code = xml_value(body, "Code");
  const std::optional<std::string> message = xml_value(body, "Message");
  std::string said = fmt::format("HTTP {}", status);
  if (code) said = fmt::format("{}, {}", *code, said);
  if (message) said += ": " + *message;
  const auto is = [&](std::string_view name) { return code && *code == name; };

  if (is("NoSuchBucket")) {
    return Status::not_found(fmt::format("{}: {}: bucket {} does not exist ({})", describe(), what,
                                         config_.bucket, said));
  }
  if (status == 404) {
    return Status::not_found(fmt::format("{}: object not found: {} ({})", describe(), key, said));
  }

  // What to do about it, where S3's answer says.
  std::string hint;
  std::optional<std::string> region = xml_value(body, "Region");
  if (!region) region = response.header("x-amz-bucket-region");
  const std::string key_id = config_.credentials ? config_.credentials->access_key_id : "";
  if (region && !region->empty() && *region != config_.region) {
    hint =
        fmt::format("bucket {} is in region {}, not {}", config_.bucket, *region, config_.region);
    if (config_.scheme == "s3") hint += ": set AWS_REGION=" + *region;
  } else if (is("SignatureDoesNotMatch")) {
    hint = fmt::format(
        "the server computed another signature with the secret it holds for access key {}: "
        "check AWS_SECRET_ACCESS_KEY",
        key_id);
  } else if (is("InvalidAccessKeyId")) {
    hint = fmt::format("the server knows no access key {}: check AWS_ACCESS_KEY_ID", key_id);
    if (config_.credentials && config_.credentials->session_token.empty()) {
      hint += ", and set AWS_SESSION_TOKEN if the key is a temporary one";
    }
  } else if (is("InvalidToken") || is("ExpiredToken") || is("TokenRefreshRequired")) {
    hint = config_.credentials && config_.credentials->session_token.empty()
               ? "the server wants a session token: set AWS_SESSION_TOKEN"
               : "the session token was refused: check AWS_SESSION_TOKEN (it must be the one "
                 "issued with AWS_ACCESS_KEY_ID " +
                     key_id + ", and not expired)";
  } else if (is("RequestTimeTooSkewed")) {
    const std::optional<int64_t> sent = utc_seconds(xml_value(body, "RequestTime").value_or(""));
    const std::optional<int64_t> now = utc_seconds(xml_value(body, "ServerTime").value_or(""));
    if (sent && now) {
      const int64_t minutes = (std::max(*sent, *now) - std::min(*sent, *now) + 30) / 60;
      hint = fmt::format("this machine's clock is {} minutes {} the server's", minutes,
                         *sent < *now ? "behind" : "ahead of");
    } else {
      hint = "this machine's clock and the server's are more than 15 minutes apart";
    }
    hint += ": set the clock right (NTP)";
  } else if (is("AccessDenied") && !config_.credentials && config_.bearer_token.empty()) {
    hint =
        "the request went without credentials: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY";
  } else if (is("PermanentRedirect")) {
    if (const std::optional<std::string> endpoint = xml_value(body, "Endpoint")) {
      hint = "the bucket is served at " + *endpoint;
    }
  }
  const std::string text =
      fmt::format("{}: {}: {}", describe(), what, hint.empty() ? said : hint + " (" + said + ")");
  if (status == 416) return Status::out_of_range(text);
  if (status == 408 || status == 429 || status >= 500 || is("RequestTimeout") || is("SlowDown") ||
      is("InternalError")) {
    return Status::unavailable(text);
  }
  return Status::io_error(text);
}

Result<uint64_t> S3Store::stat(const std::string& key, const IoContext& io) {
  Result<ObjectInfo> info = stat_info(key, io);
  if (!info) return info.status();
  return info->size;
}

// The version is the ETag (a GCS generation through the gs:// path).
Result<ObjectInfo> S3Store::stat_info(const std::string& key, const IoContext& io) {
  LB_RETURN_IF_ERROR(check_key(key));
  const std::string what = "stat " + key;
  const HttpRequest head = request("HEAD", key, {}, {}, {});
  Result<std::unique_ptr<HttpResponse>> response = client_.send(head, io);
  if (!response) return transport_failure(what, head, response.status());
  const long status = (*response)->status();
  if (status == 200) return info_from_head(std::move(response), head, describe(), key);
  if (status != 408 && status != 429 && status < 500) {
    // A HEAD answer has no body to say why it failed; the same request as a
    // one-byte GET fails alike, with the body that does.
    const HttpRequest probe = request("GET", key, {}, {{"Range", "bytes=0-0"}}, {});
    Result<std::unique_ptr<HttpResponse>> answer = client_.send(probe, io);
    if (answer && (*answer)->status() == status) {
      Result<std::string> body = (*answer)->read_all(kErrorBodyLimit);
      return answer_failure(what, key, **answer, status, body ? *body : "");
    }
  }
  return answer_failure(what, key, **response, status, "");
}

Result<std::unique_ptr<RangeReader>> S3Store::open_range(const std::string& key, uint64_t offset,
                                                         uint64_t length, const IoContext& io) {
  LB_RETURN_IF_ERROR(check_key(key));
  if (length == 0) {
    return empty_range(*this, key, offset, io);
  }
  const std::string what = fmt::format("read {} [{}, +{})", key, offset, length);
  HttpRequest get = request("GET", key, {}, {{"Range", range_header(offset, length)}}, {});
  Result<std::unique_ptr<HttpResponse>> response = client_.send(get, io);
  if (!response) return transport_failure(what, get, response.status());
  const long status = (*response)->status();
  if (status != 200 && status != 206) {
    Result<std::string> body = (*response)->read_all(kErrorBodyLimit);
    return answer_failure(what, key, **response, status, body ? *body : "");
  }
  return range_reader(std::move(response).value(), std::move(get), describe(), key, offset, length);
}

Status S3Store::put(const std::string& key, std::span<const std::byte> data, const IoContext& io) {
  LB_RETURN_IF_ERROR(check_key(key));
  if (data.size() > config_.multipart_threshold) return put_multipart(key, data, io);
  const std::string what = "put " + key;
  const HttpRequest put = request("PUT", key, {}, {}, data);
  Result<std::unique_ptr<HttpResponse>> response = client_.send(put, io);
  if (!response) return transport_failure(what, put, response.status());
  Result<std::string> body = (*response)->read_all(kErrorBodyLimit);
  if ((*response)->status() != 200) {
    return answer_failure(what, key, **response, (*response)->status(), body ? *body : "");
  }
  return Status::ok();
}

Status S3Store::put_multipart(const std::string& key, std::span<const std::byte> data,
                              const IoContext& io) {
  const uint64_t parts = (data.size() + config_.part_size - 1) / config_.part_size;
  const std::string what = fmt::format("put {} (multipart upload of {} parts)", key, parts);
  LB_RETURN_IF_ERROR(io.check(describe() + ": " + what));
  // Start the upload. (A stop while this request is out may leave an
  // upload on the server whose ID never reached us: nothing to abort.)
  const HttpRequest start = request("POST", key, {{"uploads", ""}}, {}, {});
  Result<std::unique_ptr<HttpResponse>> started = client_.send(start, io);
  if (!started) return transport_failure(what, start, started.status());
  Result<std::string> started_body = (*started)->read_all(kResponseLimit);
  if ((*started)->status() != 200) {
    return answer_failure(what, key, **started, (*started)->status(),
                          started_body ? *started_body : "");
  }
  if (!started_body) return transport_failure(what, start, started_body.status());
  const std::optional<std::string> upload_id = xml_value(*started_body, "UploadId");
  if (!upload_id) {
    return Status::corruption(
        fmt::format("{}: {}: the answer names no UploadId", describe(), what));
  }

  std::string complete = "<CompleteMultipartUpload>";
  for (uint64_t part = 1; part <= parts; ++part) {
    const std::string part_what =
        fmt::format("put {} (multipart upload, part {} of {})", key, part, parts);
    if (Status stopped = io.check(describe() + ": " + part_what); !stopped.is_ok()) {
      return abort_upload(key, *upload_id, stopped);
    }
    const uint64_t offset = (part - 1) * config_.part_size;
    const std::span<const std::byte> bytes =
        data.subspan(offset, std::min<uint64_t>(config_.part_size, data.size() - offset));
    const HttpRequest put = request(
        "PUT", key, {{"partNumber", std::to_string(part)}, {"uploadId", *upload_id}}, {}, bytes);
    Result<std::unique_ptr<HttpResponse>> sent = client_.send(put, io);
    if (!sent)
      return abort_upload(key, *upload_id, transport_failure(part_what, put, sent.status()));
    Result<std::string> body = (*sent)->read_all(kErrorBodyLimit);
    if ((*sent)->status() != 200) {
      return abort_upload(
          key, *upload_id,
          answer_failure(part_what, key, **sent, (*sent)->status(), body ? *body : ""));
    }
    if (!body)
      return abort_upload(key, *upload_id, transport_failure(part_what, put, body.status()));
    const std::optional<std::string> etag = (*sent)->header("ETag");
    if (!etag) {
      return abort_upload(
          key, *upload_id,
          Status::corruption(fmt::format("{}: {}: the answer has no ETag", describe(), part_what)));
    }
    complete += fmt::format("<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>", part, *etag);
  }
  complete += "</CompleteMultipartUpload>";
  if (Status stopped = io.check(describe() + ": " + what); !stopped.is_ok()) {
    return abort_upload(key, *upload_id, stopped);
  }
  const std::span<const std::byte> complete_bytes =
      std::as_bytes(std::span(complete.data(), complete.size()));
  const HttpRequest finish = request("POST", key, {{"uploadId", *upload_id}},
                                     {{"Content-Type", "application/xml"}}, complete_bytes);
  Result<std::unique_ptr<HttpResponse>> finished = client_.send(finish, io);
  if (!finished) {
    return abort_upload(key, *upload_id, transport_failure(what, finish, finished.status()));
  }
  Result<std::string> body = (*finished)->read_all(kResponseLimit);
  if (!body) return abort_upload(key, *upload_id, transport_failure(what, finish, body.status()));
  // S3 may answer 200 and still fail: the body says which.
  const long status = (*finished)->status();
  if (status != 200 || body->find("<Error>") != std::string::npos) {
    return abort_upload(key, *upload_id,
                        answer_failure(what, key, **finished, status == 200 ? 500 : status, *body));
  }
  return Status::ok();
}

Status S3Store::abort_upload(const std::string& key, const std::string& upload_id,
                             const Status& failure) {
  IoContext io;
  io.deadline = Clock::now() + kAbortDeadline;
  const HttpRequest abort = request("DELETE", key, {{"uploadId", upload_id}}, {}, {});
  Result<std::unique_ptr<HttpResponse>> aborted = client_.send(abort, io);
  Status outcome;
  if (!aborted) {
    outcome = transport_failure("abort", abort, aborted.status());
  } else {
    Result<std::string> body = (*aborted)->read_all(kErrorBodyLimit);
    const long status = (*aborted)->status();
    // 404 NoSuchUpload: gone already (completed or aborted).
    if (status != 204 && status != 200 && status != 404) {
      outcome = answer_failure("abort", key, **aborted, status, body ? *body : "");
    }
  }
  if (outcome.is_ok()) return failure;
  log(LogLevel::kWarn, "{}: could not abort multipart upload {} of {}: {}", describe(), upload_id,
      key, outcome.message());
  return restated(failure, fmt::format("{}; the multipart upload {} is left behind (aborting it "
                                       "failed: {}), until the bucket's lifecycle rules clear it",
                                       failure.message(), upload_id, outcome.message()));
}

Status S3Store::remove(const std::string& key, const IoContext& io) {
  // S3 deletes a missing key without complaint; the contract wants kNotFound.
  Result<uint64_t> size = stat(key, io);
  if (!size) return size.status();
  const std::string what = "remove " + key;
  const HttpRequest remove = request("DELETE", key, {}, {}, {});
  Result<std::unique_ptr<HttpResponse>> response = client_.send(remove, io);
  if (!response) return transport_failure(what, remove, response.status());
  Result<std::string> body = (*response)->read_all(kErrorBodyLimit);
  if ((*response)->status() != 204 && (*response)->status() != 200) {
    return answer_failure(what, key, **response, (*response)->status(), body ? *body : "");
  }
  return Status::ok();
}

}  // namespace lazyblock
