#include "testing/s3_server.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <thread>

#include <fmt/format.h>

namespace lazyblock::testing {
namespace {

std::string slurp(const std::filesystem::path& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

bool is_number(const std::string& text) {
  return !text.empty() && std::all_of(text.begin(), text.end(),
                                      [](unsigned char c) { return std::isdigit(c) != 0; });
}

}  // namespace

Result<std::unique_ptr<S3Server>> S3Server::start(const std::vector<std::string>& buckets,
                                                  Options options) {
  const std::string dir_s3rver = std::string(LAZYBLOCK_SOURCE_DIR) + "/tests/s3rver";
  const std::string front = dir_s3rver + "/sigv4_front.js";
  for (const std::string& needed :
       {std::string("/usr/bin/node"), dir_s3rver + "/node_modules/s3rver/package.json",
        dir_s3rver + "/node_modules/@aws-sdk/signature-v4/package.json"}) {
    if (::access(needed.c_str(), R_OK) != 0) {
      return Status::not_found(fmt::format(
          "the S3 test server is not installed ({} missing): run scripts/install-deps", needed));
    }
  }
  Result<ScratchDir> dir = ScratchDir::create();
  if (!dir) return dir.status();
  const std::filesystem::path ready = dir->path() / "ready";
  const std::string log = (dir->path() / "server.log").string();
  std::vector<std::string> args = {"/usr/bin/node",
                                   front,
                                   "--data",
                                   (dir->path() / "data").string(),
                                   "--ready",
                                   ready.string(),
                                   "--log",
                                   (dir->path() / "requests.log").string(),
                                   "--address",
                                   options.address,
                                   "--port",
                                   std::to_string(options.port),
                                   "--region",
                                   options.region,
                                   "--access-key-id",
                                   kAccessKeyId,
                                   "--secret-access-key",
                                   kSecretAccessKey,
                                   "--clock-skew-seconds",
                                   std::to_string(options.clock_skew.count()),
                                   "--fail-part",
                                   std::to_string(options.fail_part),
                                   "--stall-part",
                                   std::to_string(options.stall_part)};
  if (!options.session_token.empty()) {
    args.push_back("--session-token");
    args.push_back(options.session_token);
  }
  if (options.anonymous_reads) args.push_back("--anonymous-reads");
  for (const std::string& bucket : buckets) {
    args.push_back("--bucket");
    args.push_back(bucket);
  }
  SpawnOptions spawn;
  spawn.stdout_to = log;
  spawn.stderr_to = log;
  spawn.own_process_group = true;  // node and whatever it starts
  Result<ChildProcess> child = ChildProcess::spawn(std::move(args), spawn);
  if (!child) return child.status();
  // The front writes its port to `ready` (by rename, so never half) once it
  // accepts connections.
  const auto written = [&] {
    std::error_code error;
    return std::filesystem::exists(ready, error);
  };
  if (child->wait_until(written, std::chrono::seconds(30))) {
    const std::string text = slurp(ready);
    uint16_t port = 0;
    const auto [end, parsed] = std::from_chars(text.data(), text.data() + text.size(), port);
    if (parsed == std::errc() && port != 0) {
      return std::unique_ptr<S3Server>(
          new S3Server(std::move(dir).value(), options.address, port, std::move(*child)));
    }
  }
  child->kill_hard();
  const std::string output = slurp(log);
  const std::string message = fmt::format("the S3 test server did not start on {}:{}: {}",
                                          options.address, options.port, output);
  if (output.find("EADDRINUSE") != std::string::npos ||
      output.find("EACCES") != std::string::npos) {
    return Status::unavailable(message);
  }
  return Status::io_error(message);
}

S3Server::~S3Server() = default;

std::string S3Server::endpoint() const { return fmt::format("http://{}:{}", address_, port_); }

std::vector<S3Server::Upload> S3Server::uploads(const std::string& bucket) const {
  // s3rver keeps an upload as the directory BUCKET/._S3rver_uploads/ID, with
  // the key in `key` and each part received in a file named by its number.
  std::vector<Upload> out;
  std::error_code error;
  const std::filesystem::path root = dir_.path() / "data" / bucket / "._S3rver_uploads";
  for (const auto& entry : std::filesystem::directory_iterator(root, error)) {
    if (!entry.is_directory()) continue;
    Upload upload;
    upload.id = entry.path().filename().string();
    upload.key = slurp(entry.path() / "key");
    for (const auto& file : std::filesystem::directory_iterator(entry.path(), error)) {
      if (is_number(file.path().filename().string())) ++upload.parts;
    }
    out.push_back(std::move(upload));
  }
  return out;
}

std::vector<std::string> S3Server::requests() const {
  std::vector<std::string> lines;
  std::ifstream in(dir_.path() / "requests.log");
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

}  // namespace lazyblock::testing
