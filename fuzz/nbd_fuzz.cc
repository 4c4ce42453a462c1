// libFuzzer target: arbitrary bytes as an NBD client's whole conversation
// (handshake and requests), fed straight into an nbd::Session: the input is
// the transport's byte source, replies go to a buffer, and requests run
// inline, so no socket and no thread is made per input. The session must
// answer or end, never crash, hang or allocate past its limits; a
// zero-filled 64 KiB disk with an overlay stands behind it.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "image/device.h"
#include "image/overlay.h"
#include "serve/nbd/session.h"

namespace {

using namespace lazyblock;

// The input as what the client says; what the session answers is kept
// (and dropped with the next input).
class BufferTransport final : public nbd::Transport {
 public:
  BufferTransport(const uint8_t* data, size_t size, std::vector<std::byte>& replies)
      : data_(data), size_(size), replies_(replies) {}

  bool read(std::span<std::byte> buffer) override {
    if (buffer.size() > size_ - offset_) return false;  // the client went away
    if (buffer.empty()) return true;
    std::memcpy(buffer.data(), data_ + offset_, buffer.size());
    offset_ += buffer.size();
    return true;
  }
  bool write(std::span<const std::byte> data) override {
    replies_.insert(replies_.end(), data.begin(), data.end());
    return true;
  }

 private:
  const uint8_t* const data_;
  const size_t size_;
  size_t offset_ = 0;
  std::vector<std::byte>& replies_;
};

// Every request runs at once on the caller's thread, with no budget to wait for.
class InlineRunner final : public nbd::RequestRunner {
 public:
  bool admit(uint64_t) override { return true; }
  void release(uint64_t) override {}
  void run(std::function<void()> request) override { request(); }
};

// Small, so that the largest read an input can make (the whole disk) is cheap.
constexpr uint64_t kDiskSize = 64 * 1024;

struct Fixture {
  Fixture() {
    image::Header header;
    header.size = kDiskSize;
    header.build_id = header.base_build_id = image::Uuid::random();
    header.mappings = {{0, kDiskSize, image::Uuid::nil(), 0}};
    // Zero mappings never reach the store: none is needed.
    files = std::make_shared<image::DataFiles>(nullptr, ChunkerOptions{});
    device = std::make_unique<image::Device>(files, header, "disk");
    Result<std::unique_ptr<image::Overlay>> opened = image::Overlay::open(*device, std::nullopt);
    if (!opened) std::abort();
    overlay = std::move(opened).value();
  }
  std::shared_ptr<image::DataFiles> files;
  std::unique_ptr<image::Device> device;
  std::unique_ptr<image::Overlay> overlay;
  std::vector<std::byte> replies;
  std::atomic<uint64_t> requests{0};
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Fixture* fixture = new Fixture();  // lives for the whole run
  fixture->replies.clear();
  const nbd::Export disk{"disk", *fixture->overlay};
  BufferTransport transport(data, size, fixture->replies);
  InlineRunner runner;
  nbd::Session session(disk, transport, runner, fixture->requests);
  session.run();
  return 0;
}
