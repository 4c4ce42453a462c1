// libFuzzer target: arbitrary bytes as an NBD client's whole conversation
// with the server (handshake and requests), over a real Unix socket. The
// server must answer or close, never crash, hang or allocate past its
// limits; a zero-filled 1 MiB disk with an overlay stands behind it.
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <thread>

#include "image/device.h"
#include "image/overlay.h"
#include "serve/nbd/nbd_server.h"

namespace {

using namespace lazyblock;

struct Fixture {
  Fixture() {
    image::Header header;
    header.size = 1 << 20;
    header.build_id = header.base_build_id = image::Uuid::random();
    header.mappings = {{0, 1 << 20, image::Uuid::nil(), 0}};
    // Nil mappings never reach the store: none is needed.
    files = std::make_shared<image::DataFiles>(nullptr, ChunkerOptions{});
    device = std::make_unique<image::Device>(files, header, "disk");
    overlay = std::move(image::Overlay::open(*device, std::nullopt).value());
    server = std::make_unique<nbd::NbdServer>(nbd::Export{"disk", device.get(), overlay.get()},
                                              ConnectionLimits{}, 4);
    socket = std::filesystem::temp_directory_path() /
             ("lazyblock-nbd-fuzz-" + std::to_string(::getpid()) + ".sock");
    if (!server->listen_unix(socket).is_ok()) std::abort();
    serving = std::thread([this] { (void)server->serve(); });
  }
  ~Fixture() {
    server->stop();
    serving.join();
  }
  std::shared_ptr<image::DataFiles> files;
  std::unique_ptr<image::Device> device;
  std::unique_ptr<image::Overlay> overlay;
  std::unique_ptr<nbd::NbdServer> server;
  std::filesystem::path socket;
  std::thread serving;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture* fixture = new Fixture();  // lives for the whole run
  const int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  std::strncpy(address.sun_path, fixture->socket.c_str(), sizeof address.sun_path - 1);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) std::abort();
  // Everything the client says, then the end of what it says; then read
  // whatever the server answers until it closes.
  size_t sent = 0;
  while (sent < size) {
    const ssize_t put = ::send(fd, data + sent, size - sent, MSG_NOSIGNAL);
    if (put <= 0) break;  // the server closed early: fine
    sent += static_cast<size_t>(put);
  }
  ::shutdown(fd, SHUT_WR);
  char buffer[65536];
  while (::recv(fd, buffer, sizeof buffer, 0) > 0) {
  }
  ::close(fd);
  return 0;
}
