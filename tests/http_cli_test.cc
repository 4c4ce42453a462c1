// lazyblock against a real nginx on 127.0.0.1: whole objects byte-exact,
// the persistent cache serving a second process, and every misbehaviour of
// the upstream ending in exit status 1 with a message naming the key and
// no output file.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "common/units.h"
#include "testing/nginx_server.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "tests/cli_runner.h"

namespace lazyblock {
namespace {

const std::string kKey = "b1/rootfs.ext4";

int count_of(const std::string& text, const std::string& part) {
  int count = 0;
  for (size_t at = text.find(part); at != std::string::npos; at = text.find(part, at + 1)) ++count;
  return count;
}

// Each failure is one line on stderr, naming the store and the key once
// (not once per layer the error passed through).
void expect_one_error_naming_once(const std::string& err, const std::string& store,
                                  const std::string& key) {
  EXPECT_EQ(count_of(err, "\n"), 1) << err;
  EXPECT_EQ(count_of(err, "lazyblock: error: "), 1) << err;
  EXPECT_NE(err.find(store), std::string::npos) << err;
  EXPECT_EQ(count_of(err, key), 1) << err;
}

class HttpCliTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Result<std::unique_ptr<testing::NginxServer>> server = testing::NginxServer::start();
    ASSERT_TRUE(server) << server.status().to_string();
    server_ = std::move(server).value();
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    dir_ = scratch_->path();
  }

  // Puts an object of `size` pattern bytes on the server; returns its bytes.
  std::string serve(uint64_t size) {
    const std::vector<std::byte> data = testing::make_pattern(23, 0, size);
    const std::filesystem::path file = server_->docroot() / kKey;
    std::filesystem::create_directories(file.parent_path());
    std::ofstream(file, std::ios::binary)
        .write(reinterpret_cast<const char*>(data.data()),
               static_cast<std::streamsize>(data.size()));
    return std::string(reinterpret_cast<const char*>(data.data()), data.size());
  }

  Outcome cat(const std::string& prefix, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {"cat", "--store", server_->url() + prefix, "--key",
                                     kKey,  "-o",      (dir_ / "out").string()};
    args.insert(args.end(), extra.begin(), extra.end());
    return run_lazyblock(dir_, args);
  }

  std::unique_ptr<testing::NginxServer> server_;
  std::optional<testing::ScratchDir> scratch_;
  std::filesystem::path dir_;
};

TEST_F(HttpCliTest, CatIsByteExact) {
  const std::string expected = serve(37 * kMiB + 4097);
  Outcome run = cat("");
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(slurp(dir_ / "out") == expected);
}

TEST_F(HttpCliTest, ASecondProcessIsServedByTheCacheDirAskingTheServerOnlyItsVersion) {
  const std::string expected = serve(9 * kMiB + 5);
  const std::string cache_dir = (dir_ / "chunks").string();
  Outcome first = cat("", {"--cache-dir", cache_dir});
  ASSERT_EQ(first.status, 0) << first.err;
  const std::string log_before = server_->access_log();
  // The second process points at the same server, and asks it one HEAD.
  Outcome second = run_lazyblock(dir_, {"cat", "--store", server_->url(), "--key", kKey,
                                        "--cache-dir", cache_dir, "-o", (dir_ / "out2").string()});
  ASSERT_EQ(second.status, 0) << second.err;
  EXPECT_TRUE(slurp(dir_ / "out2") == expected);
  const std::string sent = server_->access_log().substr(log_before.size());
  EXPECT_EQ(std::count(sent.begin(), sent.end(), '\n'), 1) << sent;
  EXPECT_NE(sent.find(" HEAD /" + kKey + " 200 "), std::string::npos) << sent;
}

TEST_F(HttpCliTest, AnOutageShorterThanTheDeadlineIsWaitedOut) {
  const std::string expected = serve(9 * kMiB + 5);
  // 500 for every request in the first 3 s; the fetch deadline is 60 s.
  Outcome run = cat("/failing-for/3", {"--timeout", "60s", "--log-level", "info"});
  ASSERT_EQ(run.status, 0) << run.err;
  EXPECT_TRUE(slurp(dir_ / "out") == expected);
  const std::string log = server_->access_log();
  EXPECT_GE(count_of(log, " /failing-for/3/" + kKey + " 500 "), 2) << log;
  EXPECT_GE(count_of(log, " /failing-for/3/" + kKey + " 206 "), 1) << log;
  EXPECT_GE(count_of(run.err, "info: "), 2) << "each retry is logged at info: " << run.err;
  EXPECT_EQ(run.err.find("warn: "), std::string::npos) << run.err;
  EXPECT_EQ(run.err.find("error: "), std::string::npos) << run.err;
}

TEST_F(HttpCliTest, WithoutRetriesAnOutageFailsOnceWithItsCause) {
  serve(9 * kMiB + 5);
  Outcome run = cat("/failing-for/60", {"--retry", "0"});
  EXPECT_EQ(run.status, 1);
  EXPECT_EQ(count_of(run.err, "HTTP 500"), 1) << "the final error, once: " << run.err;
  expect_one_error_naming_once(run.err, server_->url() + "/failing-for/60", kKey);
  EXPECT_FALSE(std::filesystem::exists(dir_ / "out"));
  // With retries that do not help, the retries are said at info only: the
  // user sees the final error, once, with how long it was tried.
  Outcome retried = cat("/failing-for/60", {"--retry", "2"});
  EXPECT_EQ(retried.status, 1);
  expect_one_error_naming_once(retried.err, server_->url() + "/failing-for/60", kKey);
  EXPECT_NE(retried.err.find("gave up after 2 retries"), std::string::npos) << retried.err;
  Outcome told = cat("/failing-for/60", {"--retry", "2", "--log-level", "info"});
  EXPECT_EQ(count_of(told.err, "lazyblock: info: "), 2) << told.err;
  EXPECT_EQ(count_of(told.err, "lazyblock: error: "), 1) << told.err;
  EXPECT_EQ(told.err.find("warn: "), std::string::npos) << told.err;
}

TEST_F(HttpCliTest, AFourHundredOtherThan408Or429FailsAtOnce) {
  serve(kMiB);
  // (Not 408: nginx answers it by closing the connection, which is a
  // transport failure, retried as such.)
  for (const int code : {400, 403, 410, 429}) {
    const std::string prefix = fmt::format("/status/{}", code);
    const int before = count_of(server_->access_log(), prefix + "/");
    Outcome run = cat(prefix, {"--retry", "1", "--log-level", "info"});
    EXPECT_EQ(run.status, 1) << code << ": " << run.err;
    EXPECT_NE(run.err.find(fmt::format("HTTP {}", code)), std::string::npos) << run.err;
    EXPECT_EQ(count_of(run.err, "lazyblock: error: "), 1) << run.err;
    EXPECT_NE(run.err.find(server_->url() + prefix), std::string::npos) << run.err;
    const bool passing = code == 429;  // a throttle passes
    EXPECT_EQ(count_of(run.err, "(retry 1 of 1 in"), passing ? 1 : 0) << code << ": " << run.err;
    EXPECT_EQ(count_of(server_->access_log(), prefix + "/") - before, passing ? 2 : 1)
        << code << ": " << server_->access_log();
  }
}

struct Misbehaviour {
  const char* prefix;
  const char* cause;  // in the message
};

TEST_F(HttpCliTest, EveryMisbehaviourIsAnErrorNamingTheKeyAndLeavesNoFile) {
  serve(6 * kMiB);
  for (const Misbehaviour& m :
       {Misbehaviour{"/full", "whole object"}, Misbehaviour{"/wrong-range", "not the range asked"},
        Misbehaviour{"/truncated", "b1/rootfs.ext4"}, Misbehaviour{"/status/503", "HTTP 503"},
        Misbehaviour{"/status/403", "access denied"}, Misbehaviour{"/stall", "deadline"},
        Misbehaviour{"/slow", "deadline"}}) {
    // Through a chunker, and as one stream with no cache (--parallel 1).
    for (const char* parallel : {"8", "1"}) {
      Outcome run = cat(m.prefix, {"--timeout", "1s", "--retry", "1", "--parallel", parallel});
      EXPECT_EQ(run.status, 1) << m.prefix << " " << parallel << ": " << run.err;
      expect_one_error_naming_once(run.err, server_->url() + m.prefix, kKey);
      EXPECT_NE(run.err.find(m.cause), std::string::npos) << m.prefix << ": " << run.err;
      EXPECT_FALSE(std::filesystem::exists(dir_ / "out")) << m.prefix;
    }
  }
  Outcome missing = run_lazyblock(dir_, {"cat", "--store", server_->url(), "--key", "nope"});
  EXPECT_EQ(missing.status, 1);
  EXPECT_NE(missing.err.find(server_->url() + ": object not found: nope"), std::string::npos)
      << missing.err;
  expect_one_error_naming_once(missing.err, server_->url(), "nope");
}

TEST_F(HttpCliTest, AHostNameThatDoesNotResolveFailsAtOnceSayingSo) {
  // In a network namespace of its own (loopback only) no query leaves the
  // machine, and the name cannot resolve.
  Outcome run = run_program(dir_, "unshare",
                            {"-n", lazyblock_binary(), "cat", "--store", "http://store.example/p",
                             "--key", kKey, "-o", (dir_ / "out").string(), "--log-level", "info"});
  if (run.status != 1 || run.err.find("lazyblock: ") == std::string::npos) {
    GTEST_SKIP() << "cannot make a network namespace here: " << run.err;
  }
  EXPECT_EQ(count_of(run.err, "lazyblock: error: "), 1) << run.err;
  EXPECT_EQ(count_of(run.err, "retry"), 0) << "a typo is not worth retrying: " << run.err;
  EXPECT_NE(run.err.find("store.example"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("the host name does not resolve"), std::string::npos) << run.err;
  EXPECT_FALSE(std::filesystem::exists(dir_ / "out"));
}

}  // namespace
}  // namespace lazyblock
