// SigV4 against AWS's published examples: the signature test suite
// (service "service", us-east-1, 2015-08-30 12:36:00) and the S3 GET Object
// example of the S3 API reference.
#include "storage/sigv4.h"

#include <gtest/gtest.h>

namespace lazyblock {
namespace {

const SigV4Credentials kSuiteKeys{"AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", ""};
const std::string kEmptySha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

SigV4Signature sign_suite(std::string method, std::string uri,
                          std::vector<std::pair<std::string, std::string>> query = {}) {
  SigV4Request request;
  request.method = std::move(method);
  request.canonical_uri = std::move(uri);
  request.query = std::move(query);
  request.headers = {{"Host", "example.amazonaws.com"}, {"X-Amz-Date", "20150830T123600Z"}};
  request.payload_sha256 = kEmptySha256;
  return sigv4_sign(request, kSuiteKeys, "us-east-1", "service", "20150830T123600Z");
}

TEST(SigV4Test, GetVanilla) {
  const SigV4Signature s = sign_suite("GET", "/");
  EXPECT_EQ(s.canonical_request,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\n"
            "host;x-amz-date\n" +
                kEmptySha256);
  EXPECT_EQ(s.string_to_sign,
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n"
            "bb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63");
  EXPECT_EQ(s.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
            "SignedHeaders=host;x-amz-date, "
            "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31");
}

TEST(SigV4Test, QueryParametersAreSortedByName) {
  const SigV4Signature s = sign_suite("GET", "/", {{"Param2", "value2"}, {"Param1", "value1"}});
  EXPECT_NE(s.canonical_request.find("\nParam1=value1&Param2=value2\n"), std::string::npos)
      << s.canonical_request;
  EXPECT_EQ(s.signature, "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500");
}

TEST(SigV4Test, PostVanillaAndPostWithAQuery) {
  const SigV4Signature post = sign_suite("POST", "/");
  EXPECT_EQ(post.string_to_sign.substr(post.string_to_sign.rfind('\n') + 1),
            "553f88c9e4d10fc9e109e2aeb65f030801b70c2f6468faca261d401ae622fc87");
  EXPECT_EQ(post.signature, "5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b");
  EXPECT_EQ(sign_suite("POST", "/", {{"Param1", "value1"}}).signature,
            "28038455d6de14eafc1f9222cf5aa6f1a96197d7deb8263271d420d138af7f11");
}

TEST(SigV4Test, PathsAreSignedEncodedOnce) {
  // get-utf8: the path "/ሴ"; get-space: "/example space/".
  EXPECT_EQ(uri_encode("/\xe1\x88\xb4", true), "/%E1%88%B4");
  EXPECT_EQ(sign_suite("GET", uri_encode("/\xe1\x88\xb4", true)).signature,
            "8318018e0b0f223aa2bbf98705b62bb787dc9c0e678f255a891fd03141be5d85");
  EXPECT_EQ(sign_suite("GET", uri_encode("/example space/", true)).signature,
            "652487583200325589f1fba4c7e578f72c47cb61beeca81406b39ddec1366741");
}

TEST(SigV4Test, S3GetObjectExample) {
  // GET /test.txt of examplebucket, bytes 0-9, signed with the hash of the
  // empty body.
  SigV4Request request;
  request.method = "GET";
  request.canonical_uri = "/test.txt";
  request.headers = {{"Host", "examplebucket.s3.amazonaws.com"},
                     {"Range", "bytes=0-9"},
                     {"x-amz-content-sha256", kEmptySha256},
                     {"x-amz-date", "20130524T000000Z"}};
  request.payload_sha256 = kEmptySha256;
  const SigV4Signature s =
      sigv4_sign(request, {"AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", ""},
                 "us-east-1", "s3", "20130524T000000Z");
  EXPECT_EQ(s.canonical_request,
            "GET\n/test.txt\n\nhost:examplebucket.s3.amazonaws.com\nrange:bytes=0-9\n"
            "x-amz-content-sha256:" +
                kEmptySha256 + "\nx-amz-date:20130524T000000Z\n\n" +
                "host;range;x-amz-content-sha256;x-amz-date\n" + kEmptySha256);
  EXPECT_EQ(s.string_to_sign,
            "AWS4-HMAC-SHA256\n20130524T000000Z\n20130524/us-east-1/s3/aws4_request\n"
            "7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972");
  EXPECT_EQ(s.authorization,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
            "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41");
}

TEST(SigV4Test, HeaderValuesAreTrimmedAndRepeatsJoined) {
  SigV4Request request;
  request.method = "GET";
  request.canonical_uri = "/";
  request.headers = {{"Host", "h"}, {"My-Header", "  a   b  "}, {"my-header", "c"}};
  request.payload_sha256 = "UNSIGNED-PAYLOAD";
  const SigV4Signature s = sigv4_sign(request, kSuiteKeys, "r", "s", "20150830T123600Z");
  EXPECT_NE(s.canonical_request.find("\nmy-header:a b,c\n"), std::string::npos)
      << s.canonical_request;
  EXPECT_EQ(s.signed_headers, "host;my-header");
}

TEST(SigV4Test, Helpers) {
  EXPECT_EQ(sha256_hex(std::string_view("")), kEmptySha256);
  EXPECT_EQ(uri_encode("a b/c~d*", false), "a%20b%2Fc~d%2A");
  EXPECT_EQ(amz_date(std::chrono::system_clock::time_point(std::chrono::seconds(1440938160))),
            "20150830T123600Z");
}

}  // namespace
}  // namespace lazyblock
