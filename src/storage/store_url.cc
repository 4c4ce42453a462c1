#include "storage/store_url.h"

#include <cstdlib>
#include <filesystem>

#include <fmt/format.h>

#include "storage/file_store.h"
#include "storage/http_store.h"
#include "storage/s3_store.h"

namespace lazyblock {
namespace {

// The CA bundle to verify TLS servers with: the flag's, else the first of
// the variables that tools of the kind read (the AWS CLI and SDKs, then
// OpenSSL), else none (the system's).
Result<HttpClientOptions> http_client_options(const StoreStackOptions& options) {
  HttpClientOptions http;
  std::string origin = "--ca-file";
  http.ca_file = options.ca_file;
  for (const char* variable : {"AWS_CA_BUNDLE", "SSL_CERT_FILE"}) {
    if (!http.ca_file.empty()) break;
    const char* value = std::getenv(variable);
    if (value != nullptr && *value != '\0') {
      http.ca_file = value;
      origin = variable;
    }
  }
  if (!http.ca_file.empty()) {
    std::error_code error;
    if (!std::filesystem::is_regular_file(http.ca_file, error)) {
      return Status::invalid_argument(fmt::format(
          "{} {}: no such file (expected the CA certificates, PEM)", origin, http.ca_file));
    }
  }
  return http;
}

}  // namespace

Result<std::shared_ptr<ObjectStore>> open_store(const std::string& url,
                                                const StoreStackOptions& options) {
  const size_t colon = url.find("://");
  const std::string scheme = colon == std::string::npos ? "" : url.substr(0, colon);
  std::shared_ptr<ObjectStore> store;
  if (scheme == "file") {
    const std::string path = url.substr(colon + 3);
    if (path.empty()) return Status::invalid_argument("store URL file:// names no directory");
    if (options.create_directory) {
      std::error_code error;
      std::filesystem::create_directories(path, error);
      if (error) {
        return Status::io_error(
            fmt::format("create store directory {}: {}", path, error.message()));
      }
    }
    Result<std::shared_ptr<FileStore>> files = FileStore::open(path);
    if (!files) return files.status();
    store = *files;
  } else if (scheme == "http" || scheme == "https") {
    Result<HttpClientOptions> client = http_client_options(options);
    if (!client) return client.status();
    Result<std::shared_ptr<HttpStore>> http = HttpStore::open(url, *client);
    if (!http) return http.status();
    store = *http;
  } else if (scheme == "s3" || scheme == "gs") {
    Result<S3Config> config = S3Config::from_url(url);
    if (!config) return config.status();
    Result<HttpClientOptions> client = http_client_options(options);
    if (!client) return client.status();
    Result<std::shared_ptr<S3Store>> s3 = S3Store::open(std::move(config).value(), *client);
    if (!s3) return s3.status();
    store = *s3;
  } else {
    return Status::invalid_argument(
        fmt::format("invalid store URL '{}' (expected file:///DIR, http(s)://HOST/PREFIX, "
                    "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX)",
                    url));
  }
  if (options.faults) store = std::make_shared<FaultStore>(store, *options.faults);
  if (options.simulate) store = std::make_shared<SimulateStore>(store, *options.simulate);
  // Above the simulated link: a retry pays its time to first byte again.
  if (options.retry) store = std::make_shared<RetryStore>(store, *options.retry);
  // Outermost: a chunk in the directory costs no request below.
  if (options.disk_cache) {
    Result<std::shared_ptr<DiskCacheStore>> cached =
        DiskCacheStore::open(store, *options.disk_cache);
    if (!cached) return cached.status();
    store = *cached;
  }
  return store;
}

}  // namespace lazyblock
