// AWS Signature Version 4: the signing of S3 (and GCS interoperability)
// requests, with OpenSSL's SHA-256 and HMAC.
//
// The caller builds the request it will send, including the headers to
// sign (host, x-amz-date, x-amz-content-sha256, x-amz-security-token),
// and gets back the Authorization header; the steps in between (canonical
// request, string to sign, signature) are returned too, so that tests can
// check each against AWS's published examples.
#pragma once

#include <chrono>
#include <cstddef>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lazyblock {

struct SigV4Credentials {
  std::string access_key_id;
  std::string secret_access_key;
  std::string session_token;  // empty for long-term keys
};

struct SigV4Request {
  std::string method;
  // The path as sent, already percent-encoded (uri_encode(path, true)); S3
  // signs it as is.
  std::string canonical_uri;
  // Query parameters, not encoded: signing encodes and sorts them.
  std::vector<std::pair<std::string, std::string>> query;
  // The headers to sign, exactly as sent; must include host (which S3Store
  // therefore sends itself, rather than leave it to curl).
  std::vector<std::pair<std::string, std::string>> headers;
  // Hex SHA-256 of the body, or "UNSIGNED-PAYLOAD".
  std::string payload_sha256;
};

struct SigV4Signature {
  std::string canonical_request;
  std::string string_to_sign;
  std::string signed_headers;  // "host;range;x-amz-date"
  std::string signature;       // hex
  std::string authorization;   // the Authorization header's value
};

// Signs `request` at `amz_date` ("20150830T123600Z").
SigV4Signature sigv4_sign(const SigV4Request& request, const SigV4Credentials& credentials,
                          std::string_view region, std::string_view service,
                          std::string_view amz_date);

// "YYYYMMDDTHHMMSSZ" for a time.
std::string amz_date(std::chrono::system_clock::time_point time);

// Hex SHA-256.
std::string sha256_hex(std::span<const std::byte> data);
std::string sha256_hex(std::string_view text);

// Percent-encoding as SigV4 wants it: A-Z a-z 0-9 - _ . ~ stay, every other
// byte becomes %XX (upper-case hex); '/' stays if `keep_slash`.
std::string uri_encode(std::string_view text, bool keep_slash);

// The canonical query string: names and values encoded, sorted, joined.
std::string canonical_query(const std::vector<std::pair<std::string, std::string>>& query);

}  // namespace lazyblock
