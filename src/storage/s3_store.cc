#include "storage/s3_store.h"

#include <cstdlib>

#include <fmt/format.h>

#include "common/log.h"
#include "storage/http_store.h"

namespace lazyblock {
namespace {

constexpr size_t kResponseLimit = 1024 * 1024;  // XML answers are small

std::string env(const char* name) {
  const char* value = std::getenv(name);
  return value != nullptr ? value : "";
}

// The text between <tag> and </tag>, if any.
std::optional<std::string> xml_value(std::string_view xml, std::string_view tag) {
  const std::string open = fmt::format("<{}>", tag);
  const std::string close = fmt::format("</{}>", tag);
  const size_t begin = xml.find(open);
  if (begin == std::string_view::npos) return std::nullopt;
  const size_t end = xml.find(close, begin + open.size());
  if (end == std::string_view::npos) return std::nullopt;
  return std::string(xml.substr(begin + open.size(), end - begin - open.size()));
}

// The authority ("host[:port]") of a URL.
std::string authority(std::string_view url) {
  const size_t start = url.find("://");
  url.remove_prefix(start == std::string_view::npos ? 0 : start + 3);
  return std::string(url.substr(0, url.find('/')));
}

std::string_view scheme_of(std::string_view url) { return url.substr(0, url.find("://")); }

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
  if (!key_id.empty()) config.credentials = SigV4Credentials{key_id, secret, env("AWS_SESSION_TOKEN")};

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
  return std::shared_ptr<S3Store>(new S3Store(std::move(config), options));
}

S3Store::S3Store(S3Config config, HttpClientOptions options)
    : config_(std::move(config)), client_(options) {}

std::string S3Store::describe() const {
  return fmt::format("{}://{}{}{} ({})", config_.scheme, config_.bucket,
                     config_.prefix.empty() ? "" : "/", config_.prefix, config_.endpoint);
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
    signing.headers.emplace_back("host", host);
    signing.payload_sha256 = payload;
    headers.emplace_back("Authorization",
                         sigv4_sign(signing, *config_.credentials, config_.region, "s3", date)
                             .authorization);
  }
  out.headers = std::move(headers);
  return out;
}

Result<uint64_t> S3Store::stat(const std::string& key, const IoContext& io) {
  return size_from_head(client_.send(request("HEAD", key, {}, {}, {}), io), key);
}

// The version is the ETag (a GCS generation through the gs:// path).
Result<ObjectInfo> S3Store::stat_info(const std::string& key, const IoContext& io) {
  return info_from_head(client_.send(request("HEAD", key, {}, {}, {}), io), key);
}

Result<std::unique_ptr<RangeReader>> S3Store::open_range(const std::string& key, uint64_t offset,
                                                         uint64_t length, const IoContext& io) {
  if (length == 0) return empty_range(*this, key, offset, io);
  Result<std::unique_ptr<HttpResponse>> response = client_.send(
      request("GET", key, {}, {{"Range", range_header(offset, length)}}, {}), io);
  if (!response) return response.status().with_context("read " + key);
  return range_reader(std::move(response).value(), key, offset, length);
}

Status S3Store::put(const std::string& key, std::span<const std::byte> data,
                    const IoContext& io) {
  if (data.size() > config_.multipart_threshold) return put_multipart(key, data, io);
  Result<std::unique_ptr<HttpResponse>> response =
      client_.send(request("PUT", key, {}, {}, data), io);
  if (!response) return response.status().with_context("put " + key);
  Result<std::string> body = (*response)->read_all(kResponseLimit);
  if ((*response)->status() != 200) {
    return http_failure((*response)->status(), "put " + key, key, body ? *body : "");
  }
  return Status::ok();
}

Status S3Store::put_multipart(const std::string& key, std::span<const std::byte> data,
                              const IoContext& io) {
  const std::string what = "put " + key + " (multipart)";
  // Start the upload.
  Result<std::unique_ptr<HttpResponse>> started =
      client_.send(request("POST", key, {{"uploads", ""}}, {}, {}), io);
  if (!started) return started.status().with_context(what);
  Result<std::string> started_body = (*started)->read_all(kResponseLimit);
  if (!started_body) return started_body.status().with_context(what);
  if ((*started)->status() != 200) {
    return http_failure((*started)->status(), what, key, *started_body);
  }
  const std::optional<std::string> upload_id = xml_value(*started_body, "UploadId");
  if (!upload_id) return Status::corruption(what + ": the answer names no UploadId");

  const auto abort = [&](Status failure) {
    // Best effort: an upload left behind costs storage until the bucket's
    // lifecycle rules clear it.
    Result<std::unique_ptr<HttpResponse>> aborted =
        client_.send(request("DELETE", key, {{"uploadId", *upload_id}}, {}, {}), IoContext{});
    if (!aborted || ((*aborted)->status() != 204 && (*aborted)->status() != 200)) {
      log(LogLevel::kWarn, "{}: could not abort upload {}", what, *upload_id);
    }
    return failure;
  };

  std::string complete = "<CompleteMultipartUpload>";
  int part = 0;
  for (uint64_t offset = 0; offset < data.size(); offset += config_.part_size) {
    ++part;
    const std::span<const std::byte> bytes =
        data.subspan(offset, std::min<uint64_t>(config_.part_size, data.size() - offset));
    Result<std::unique_ptr<HttpResponse>> sent = client_.send(
        request("PUT", key, {{"partNumber", std::to_string(part)}, {"uploadId", *upload_id}}, {},
                bytes),
        io);
    if (!sent) return abort(sent.status().with_context(fmt::format("{}: part {}", what, part)));
    Result<std::string> body = (*sent)->read_all(kResponseLimit);
    if ((*sent)->status() != 200) {
      return abort(http_failure((*sent)->status(), fmt::format("{}: part {}", what, part), key,
                                body ? *body : ""));
    }
    const std::optional<std::string> etag = (*sent)->header("ETag");
    if (!etag) return abort(Status::corruption(fmt::format("{}: part {} has no ETag", what, part)));
    complete += fmt::format("<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>", part, *etag);
  }
  complete += "</CompleteMultipartUpload>";
  const std::span<const std::byte> complete_bytes =
      std::as_bytes(std::span(complete.data(), complete.size()));
  Result<std::unique_ptr<HttpResponse>> finished =
      client_.send(request("POST", key, {{"uploadId", *upload_id}}, {}, complete_bytes), io);
  if (!finished) return abort(finished.status().with_context(what));
  Result<std::string> body = (*finished)->read_all(kResponseLimit);
  // S3 may answer 200 and still fail: the body says which.
  if ((*finished)->status() != 200 || !body || body->find("<Error>") != std::string::npos) {
    return abort(http_failure((*finished)->status() == 200 ? 500 : (*finished)->status(), what,
                              key, body ? *body : ""));
  }
  return Status::ok();
}

Status S3Store::remove(const std::string& key, const IoContext& io) {
  // S3 deletes a missing key without complaint; the contract wants kNotFound.
  Result<uint64_t> size = stat(key, io);
  if (!size) return size.status();
  Result<std::unique_ptr<HttpResponse>> response =
      client_.send(request("DELETE", key, {}, {}, {}), io);
  if (!response) return response.status().with_context("remove " + key);
  if ((*response)->status() != 204 && (*response)->status() != 200) {
    return http_failure((*response)->status(), "remove " + key, key, "");
  }
  return Status::ok();
}

}  // namespace lazyblock
