// https:// stores against a real nginx with TLS on 127.0.0.1, its CA and
// certificate made by the test with the openssl command: verification is on
// by default, the CA comes from --ca-file, AWS_CA_BUNDLE or SSL_CERT_FILE,
// an unknown CA or a certificate for another name fails at once (no retry)
// saying so, HTTP/2 is spoken when the server offers it, and connections
// and TLS sessions are reused (as nginx's log shows); S3 works through a
// TLS front end.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "common/units.h"
#include "storage/http_client.h"
#include "testing/nginx_server.h"
#include "testing/pattern.h"
#include "testing/s3_server.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

const std::string kKey = "b1/memfile";

int count_of(const std::string& text, const std::string& part) {
  int count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++count;
  return count;
}

// One line of the access log (see NginxServer::access_log).
struct LogLine {
  std::string connection;
  std::string method;
  std::string uri;
  int status = 0;
  int connection_requests = 0;
  std::string session_reused;
  std::string protocol;
};

std::vector<LogLine> parse_log(const std::string& log) {
  std::vector<LogLine> lines;
  std::istringstream in(log);
  for (std::string text; std::getline(in, text);) {
    std::istringstream fields(text);
    LogLine line;
    std::string bytes;
    fields >> line.connection >> line.method >> line.uri >> line.status >> bytes >>
        line.connection_requests >> line.session_reused >> line.protocol;
    lines.push_back(line);
  }
  return lines;
}

class TlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
    // The certificate names localhost only: 127.0.0.1 is "another name".
    Result<testing::TestCertificates> certificates =
        testing::TestCertificates::make(dir_ / "tls", {"localhost"});
    ASSERT_TRUE(certificates) << certificates.status().to_string();
    certificates_ = *certificates;
    testing::NginxOptions options;
    options.tls = certificates_;
    Result<std::unique_ptr<testing::NginxServer>> server =
        testing::NginxServer::start(std::nullopt, options);
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
    expected_ = serve(9 * kMiB + 5);
  }

  std::string serve(uint64_t size) {
    const std::vector<std::byte> data = testing::make_pattern(41, 0, size);
    const std::filesystem::path file = server_->docroot() / kKey;
    std::filesystem::create_directories(file.parent_path());
    std::ofstream(file, std::ios::binary)
        .write(reinterpret_cast<const char*>(data.data()), static_cast<std::streamsize>(size));
    return std::string(reinterpret_cast<const char*>(data.data()), size);
  }

  std::vector<std::string> cat_args(const std::string& host, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"cat", "--store", server_->url(host),      "--key",
                                     kKey,  "-o",      (dir_ / "out").string(), "--log-level",
                                     "info"};
    args.insert(args.end(), extra.begin(), extra.end());
    return args;
  }

  // The access log once it has `count` lines (nginx writes a request's line
  // just after its last byte, so a client may be quicker), or as it is
  // after 10 s.
  std::string log_of(size_t count) const {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    std::string log = server_->access_log();
    while (static_cast<size_t>(std::count(log.begin(), log.end(), '\n')) < count &&
           std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));  // polling a real condition
      log = server_->access_log();
    }
    return log;
  }

  // `lazyblock ARGS` with neither CA variable set (this host may set both),
  // and then `assignments` ("NAME=VALUE").
  Outcome run(std::vector<std::string> args, std::vector<std::string> assignments = {}) {
    std::vector<std::string> command = {"-u", "AWS_CA_BUNDLE", "-u", "SSL_CERT_FILE"};
    command.insert(command.end(), assignments.begin(), assignments.end());
    command.push_back(lazyblock_binary());
    command.insert(command.end(), args.begin(), args.end());
    return run_program(dir_, "env", command);
  }

  // A failure that was not retried: one error, no retry, no file.
  void expect_failed_at_once(const Outcome& run) {
    EXPECT_EQ(run.status, 1) << run.err;
    EXPECT_EQ(count_of(run.err, "lazyblock: error: "), 1) << run.err;
    EXPECT_EQ(count_of(run.err, "retry"), 0) << run.err;
    EXPECT_FALSE(std::filesystem::exists(dir_ / "out"));
  }

  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
  testing::TestCertificates certificates_;
  std::unique_ptr<testing::NginxServer> server_;
  std::string expected_;
};

TEST_F(TlsTest, CatOverHttpsWithTheCaFromCaFileSpeaksHttp2AndResumesSessions) {
  Outcome cat =
      run(cat_args("localhost", {"--ca-file", certificates_.ca.string(), "--parallel", "1"}));
  ASSERT_EQ(cat.status, 0) << cat.err;
  EXPECT_TRUE(slurp(dir_ / "out") == expected_);
  const std::string log = log_of(3);
  const std::vector<LogLine> lines = parse_log(log);
  ASSERT_EQ(lines.size(), 3u) << log;  // three 4 MiB chunks
  // Whether a connection is free for the next stream depends on timing
  // (the next opens as the last one ends); but every connection after the
  // first resumes the first one's TLS session rather than starting afresh.
  // (Lines are logged as requests end; nginx numbers connections in the
  // order they were accepted.)
  unsigned long long first = ULLONG_MAX;
  for (const LogLine& line : lines) first = std::min(first, std::stoull(line.connection));
  for (const LogLine& line : lines) {
    EXPECT_EQ(line.protocol, "HTTP/2.0") << log;
    EXPECT_EQ(line.status, 206) << log;
    if (std::stoull(line.connection) != first) {
      EXPECT_EQ(line.session_reused, "r") << log;
    }
  }
}

TEST_F(TlsTest, SequentialRequestsShareOneConnection) {
  HttpClientOptions options;
  options.ca_file = certificates_.ca.string();
  HttpClient client(options);
  HttpRequest request;
  request.url = server_->url("localhost") + "/" + kKey;
  for (int i = 0; i < 3; ++i) {
    request.headers = {{"Range", fmt::format("bytes={}-{}", i * 4096, i * 4096 + 4095)}};
    Result<std::unique_ptr<HttpResponse>> response = client.send(request, IoContext{});
    ASSERT_TRUE(response) << response.status().to_string();
    Result<std::string> body = (*response)->read_all(1 << 20);
    ASSERT_TRUE(body) << body.status().to_string();
    EXPECT_TRUE(*body == expected_.substr(static_cast<size_t>(i) * 4096, 4096));
  }
  const std::string log = log_of(3);
  const std::vector<LogLine> lines = parse_log(log);
  ASSERT_EQ(lines.size(), 3u) << log;
  for (const LogLine& line : lines) EXPECT_EQ(line.connection, lines.front().connection) << log;
  EXPECT_EQ(lines.back().connection_requests, 3) << log;
}

TEST_F(TlsTest, TheCaComesFromAwsCaBundleOrSslCertFile) {
  for (const std::string variable : {"AWS_CA_BUNDLE", "SSL_CERT_FILE"}) {
    std::filesystem::remove(dir_ / "out");
    Outcome cat = run(cat_args("localhost"), {variable + "=" + certificates_.ca.string()});
    ASSERT_EQ(cat.status, 0) << variable << ": " << cat.err;
    EXPECT_TRUE(slurp(dir_ / "out") == expected_) << variable;
  }
}

TEST_F(TlsTest, AnUnknownCaFailsAtOnceSayingSo) {
  // Verification is on by default: the system's CAs do not include the test's.
  Outcome cat = run(cat_args("localhost"));
  expect_failed_at_once(cat);
  EXPECT_NE(cat.err.find("certificate"), std::string::npos) << cat.err;
  EXPECT_NE(cat.err.find("not signed by the system's CAs"), std::string::npos) << cat.err;
  EXPECT_NE(cat.err.find("--ca-file"), std::string::npos) << cat.err;
  EXPECT_NE(cat.err.find(server_->url("localhost")), std::string::npos) << cat.err;
}

TEST_F(TlsTest, AWrongHostNameFailsAtOnceSayingSo) {
  Outcome cat = run(cat_args("127.0.0.1", {"--ca-file", certificates_.ca.string()}));
  expect_failed_at_once(cat);
  EXPECT_NE(cat.err.find("not valid for this host name"), std::string::npos) << cat.err;
  EXPECT_NE(cat.err.find("127.0.0.1"), std::string::npos) << cat.err;
}

TEST_F(TlsTest, AMissingCaFileIsAUsageError) {
  Outcome cat = run(cat_args("localhost", {"--ca-file", (dir_ / "no-such-ca.pem").string()}));
  EXPECT_EQ(cat.status, 2) << cat.err;
  EXPECT_NE(cat.err.find("--ca-file " + (dir_ / "no-such-ca.pem").string() + ": no such file"),
            std::string::npos)
      << cat.err;
  Outcome from_env =
      run(cat_args("localhost"), {"AWS_CA_BUNDLE=" + (dir_ / "no-such-ca.pem").string()});
  EXPECT_EQ(from_env.status, 2) << from_env.err;
  EXPECT_NE(from_env.err.find("AWS_CA_BUNDLE"), std::string::npos) << from_env.err;
}

TEST_F(TlsTest, ASecondConnectionResumesTheTlsSession) {
  HttpClientOptions options;
  options.ca_file = certificates_.ca.string();
  HttpClient client(options);
  HttpRequest request;
  request.url = server_->url("localhost") + "/" + kKey;
  request.headers.emplace_back("Range", "bytes=0-65535");
  // The first response is held unread, so the second request needs a
  // connection of its own: its handshake resumes the first one's session.
  Result<std::unique_ptr<HttpResponse>> first = client.send(request, IoContext{});
  ASSERT_TRUE(first) << first.status().to_string();
  ASSERT_EQ((*first)->status(), 206);
  Result<std::unique_ptr<HttpResponse>> second = client.send(request, IoContext{});
  ASSERT_TRUE(second) << second.status().to_string();
  ASSERT_EQ((*second)->status(), 206);
  for (HttpResponse* response : {first->get(), second->get()}) {
    Result<std::string> body = response->read_all(1 << 20);
    ASSERT_TRUE(body) << body.status().to_string();
    EXPECT_TRUE(*body == expected_.substr(0, 65536));
  }
  const std::string log = log_of(2);
  const std::vector<LogLine> lines = parse_log(log);
  ASSERT_EQ(lines.size(), 2u) << log;
  std::map<std::string, std::string> reused;
  for (const LogLine& line : lines) reused[line.connection] = line.session_reused;
  ASSERT_EQ(reused.size(), 2u) << "two connections: " << log;
  EXPECT_EQ(count_of(log, " r HTTP/2.0"), 1) << log;
  EXPECT_EQ(count_of(log, " . HTTP/2.0"), 1) << log;
}

TEST(TlsS3Test, PackAndExportThroughAnS3ServerOverHttps) {
  Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
  ASSERT_TRUE(scratch);
  const std::filesystem::path dir = scratch->path();
  Result<std::unique_ptr<testing::S3Server>> s3 = testing::S3Server::start({"snapshots"}, {});
  ASSERT_TRUE(s3) << s3.status().to_string();
  Result<testing::TestCertificates> certificates =
      testing::TestCertificates::make(dir / "tls", {"localhost"});
  ASSERT_TRUE(certificates) << certificates.status().to_string();
  // nginx terminates TLS and passes requests on to the (signature-checking)
  // S3 server, Host header and all.
  testing::NginxOptions options;
  options.tls = *certificates;
  options.proxy_to = (*s3)->endpoint();
  Result<std::unique_ptr<testing::NginxServer>> front =
      testing::NginxServer::start(std::nullopt, options);
  ASSERT_TRUE(front) << front.status().to_string();

  const std::string build = "5e5e5e5e-1111-4222-8333-444455556666";
  const std::vector<std::byte> image = testing::make_pattern(5, 0, 5 * kMiB);
  std::ofstream(dir / "image", std::ios::binary)
      .write(reinterpret_cast<const char*>(image.data()),
             static_cast<std::streamsize>(image.size()));
  const auto run = [&](std::vector<std::string> args) {
    std::vector<std::string> command = {
        "-u",
        "SSL_CERT_FILE",
        "AWS_ENDPOINT_URL=" + (*front)->url("localhost"),
        std::string("AWS_ACCESS_KEY_ID=") + testing::S3Server::kAccessKeyId,
        std::string("AWS_SECRET_ACCESS_KEY=") + testing::S3Server::kSecretAccessKey,
        "AWS_CA_BUNDLE=" + certificates->ca.string(),
        lazyblock_binary()};
    command.insert(command.end(), args.begin(), args.end());
    return run_program(dir, "env", command);
  };
  Outcome packed = run({"pack", "--store", "s3://snapshots/templates", "--build", build, "--name",
                        "rootfs.ext4", (dir / "image").string(), "--quiet"});
  ASSERT_EQ(packed.status, 0) << packed.err;
  Outcome exported = run({"export", "--store", "s3://snapshots/templates", "--build", build,
                          "--name", "rootfs.ext4", "-o", (dir / "out").string(), "--quiet"});
  ASSERT_EQ(exported.status, 0) << exported.err;
  EXPECT_TRUE(slurp(dir / "out") ==
              std::string(reinterpret_cast<const char*>(image.data()), image.size()));
  const std::string log = (*front)->access_log();
  EXPECT_NE(log.find(" PUT /snapshots/templates/" + build + "/rootfs.ext4"), std::string::npos)
      << log;
  EXPECT_NE(log.find(" HTTP/2.0"), std::string::npos) << log;
}

}  // namespace
}  // namespace lazyblock
