// UffdServing: a UffdServer on a thread of its own serving a memfile on a
// socket, as a memory device of `serve uffd` or of the daemon runs, for the
// benches that serve guest memory in process (bench uffd, bench fleet).
#pragma once

#include <filesystem>
#include <thread>
#include <utility>

#include "common/status.h"
#include "image/device.h"
#include "serve/uffd/uffd_server.h"

namespace lazyblock {

class UffdServing {
 public:
  UffdServing(image::Device& memfile, uffd::UffdOptions options)
      : server_(memfile, std::move(options)) {}
  ~UffdServing() { (void)stop(); }
  UffdServing(const UffdServing&) = delete;
  UffdServing& operator=(const UffdServing&) = delete;

  Status start(const std::filesystem::path& socket) {
    LB_RETURN_IF_ERROR(server_.listen_unix(socket));
    thread_ = std::thread([this] { served_ = server_.serve(); });
    return Status::ok();
  }
  // Once its VMs have gone: ends serving (records are written), and its
  // status.
  Status stop() {
    if (!thread_.joinable()) return Status::ok();
    server_.stop();
    thread_.join();
    return served_;
  }
  uffd::UffdServer& server() { return server_; }

 private:
  uffd::UffdServer server_;
  std::thread thread_;
  Status served_;  // written by thread_, read once it is joined
};

}  // namespace lazyblock
