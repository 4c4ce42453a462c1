#include "serve/nbd/nbd_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <optional>
#include <system_error>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "common/log.h"
#include "common/unix_socket.h"
#include "serve/nbd/protocol.h"

namespace lazyblock::nbd {
namespace {

// Option payloads beyond this are refused unread (names are at most 4 KiB).
constexpr uint32_t kMaxOptionBytes = 64 * 1024;

// After stop(), replies still being made may take this long to reach their
// clients; then every connection is shut down, so that a client that does
// not read its replies cannot hold the server's exit.
constexpr std::chrono::milliseconds kReplyGrace{500};

// Reply and write-payload bytes held at once by one connection, and by all.
constexpr uint64_t kConnectionBytesInFlight = 64 * 1024 * 1024;
constexpr uint64_t kTotalBytesInFlight = 256 * 1024 * 1024;
// A connection holding nothing may always have a request this small (a
// VM's reads are far smaller), so that clients which exhaust the budget by
// not reading their replies do not stall everyone else.
constexpr uint64_t kAlwaysAdmitted = 1024 * 1024;

// Reads all of `buffer`; false if the connection ended, or if `deadline`
// (when given) passed first.
bool read_exact(int fd, std::span<std::byte> buffer,
                std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt) {
  size_t done = 0;
  while (done < buffer.size()) {
    if (deadline) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(
          *deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return false;
      pollfd ready{fd, POLLIN, 0};
      const int polled = ::poll(&ready, 1, static_cast<int>(left.count()));
      if (polled < 0 && errno == EINTR) continue;
      if (polled <= 0) return false;
    }
    const ssize_t got = ::recv(fd, buffer.data() + done, buffer.size() - done, 0);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    done += static_cast<size_t>(got);
  }
  return true;
}

bool write_all(int fd, std::span<const std::byte> data) {
  size_t done = 0;
  while (done < data.size()) {
    // MSG_NOSIGNAL: a client that went away is an error here, not a SIGPIPE.
    const ssize_t put = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) return false;
    done += static_cast<size_t>(put);
  }
  return true;
}

// Reads and drops `length` bytes (a payload the server will not use).
bool discard(int fd, uint64_t length,
             std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt) {
  std::byte scratch[65536];
  while (length > 0) {
    const size_t take = static_cast<size_t>(std::min<uint64_t>(length, sizeof scratch));
    if (!read_exact(fd, std::span(scratch, take), deadline)) return false;
    length -= take;
  }
  return true;
}

// The NBD error for a failed request: a full disk is ENOSPC (the guest's
// file system sees a full disk, not a broken one).
uint32_t nbd_error(const Status& status) {
  switch (status.code()) {
    case StatusCode::kInvalidArgument: return kEinval;
    case StatusCode::kNoSpace: return kEnospc;
    case StatusCode::kCancelled: return kEshutdown;
    default: return kEio;
  }
}

// A failed read: ESHUTDOWN if the server is stopping, else EIO.
uint32_t nbd_read_error(const Status& status) {
  return status.code() == StatusCode::kCancelled ? kEshutdown : kEio;
}

}  // namespace

// One client connection: the handshake, then the requests.
class NbdServer::Session : public std::enable_shared_from_this<Session> {
 public:
  Session(NbdServer& server, int fd) : server_(server), fd_(fd) {}

  void run() {
    if (negotiate()) transmission();
    // Replies still being made need the socket; wait for them.
    std::unique_lock lock(mu_);
    idle_.wait(lock, [&] { return in_flight_ == 0; });
    lock.unlock();
    server_.session_ended(fd_);
  }

 private:
  const Export& disk() const { return server_.export_; }
  bool writable() const { return disk().overlay != nullptr; }
  uint64_t size() const { return disk().device->size(); }

  uint16_t transmission_flags() const {
    uint16_t flags = kFlagHasFlags | kFlagSendFlush | kFlagSendCache | kFlagCanMultiConn;
    if (writable()) {
      flags |= kFlagSendFua | kFlagSendTrim | kFlagSendWriteZeroes;
    } else {
      flags |= kFlagReadOnly;
    }
    return flags;
  }

  bool send(std::span<const std::byte> data) {
    std::lock_guard lock(write_mu_);
    return write_all(fd_, data);
  }
  bool send_reply(uint32_t option, uint32_t type, std::span<const std::byte> payload = {}) {
    return write_all(fd_, option_reply(option, type, payload));
  }
  bool send_error(uint32_t option, uint32_t type, const std::string& message) {
    return send_reply(option, type, std::as_bytes(std::span(message.data(), message.size())));
  }

  // The handshake within the time limit: a client that is silent, or
  // trickles, or does not read our replies, is closed when it runs out.
  bool negotiate() {
    const auto timeout = server_.limits_.handshake_timeout;
    deadline_ = std::chrono::steady_clock::now() + timeout;
    timeval send_timeout{static_cast<time_t>(timeout.count() / 1000),
                         static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof send_timeout);
    const bool agreed = handshake();
    if (!agreed) {
      if (std::chrono::steady_clock::now() >= deadline_) {
        log(LogLevel::kInfo, "nbd: a client did not finish its handshake within {} ms: closing",
            timeout.count());
      }
      return false;
    }
    // Replies may wait on a slow client as long as it likes from now on.
    send_timeout = {};
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof send_timeout);
    return true;
  }

  bool receive(std::span<std::byte> buffer) { return read_exact(fd_, buffer, deadline_); }

  bool handshake() {
    Writer greeting;
    greeting.u64(kNbdMagic).u64(kOptionMagic).u16(kFlagFixedNewstyle | kFlagNoZeroes);
    if (!write_all(fd_, greeting.data())) return false;
    std::byte flags_bytes[4];
    if (!receive(flags_bytes)) return false;
    const uint32_t client_flags = get_u32(flags_bytes);
    if ((client_flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) != 0) {
      log(LogLevel::kInfo, "nbd: a client asked for unknown flags {:#x}: closing", client_flags);
      return false;
    }
    no_zeroes_ = (client_flags & kClientFlagNoZeroes) != 0;
    for (;;) {
      std::byte header[16];
      if (!receive(header)) return false;
      if (get_u64(header) != kOptionMagic) {
        log(LogLevel::kInfo, "nbd: bad option magic: closing");
        return false;
      }
      const uint32_t option = get_u32(header + 8);
      const uint32_t length = get_u32(header + 12);
      if (length > kMaxOptionBytes) {
        if (!discard(fd_, length, deadline_)) return false;
        if (!send_error(option, kRepErrTooBig, "option data too large")) return false;
        continue;
      }
      std::vector<std::byte> data(length);
      if (!receive(data)) return false;
      switch (option) {
        case kOptExportName: {
          const std::string name(reinterpret_cast<const char*>(data.data()), data.size());
          if (!known_export(name)) return false;  // this option has no error reply
          Writer reply;
          reply.u64(size()).u16(transmission_flags());
          if (!no_zeroes_) reply.bytes(std::vector<std::byte>(124));
          return write_all(fd_, reply.data());
        }
        case kOptAbort:
          send_reply(option, kRepAck);
          return false;
        case kOptList: {
          if (!data.empty()) {
            if (!send_error(option, kRepErrInvalid, "LIST takes no data")) return false;
            break;
          }
          Writer server;
          server.u32(static_cast<uint32_t>(disk().name.size())).text(disk().name);
          if (!send_reply(option, kRepServer, server.data())) return false;
          if (!send_reply(option, kRepAck)) return false;
          break;
        }
        case kOptInfo:
        case kOptGo: {
          const int outcome = info_or_go(option, data);
          if (outcome < 0) return false;
          if (outcome > 0) return true;  // GO: transmission starts
          break;
        }
        case kOptStructuredReply:
          if (!data.empty()) {
            if (!send_error(option, kRepErrInvalid, "STRUCTURED_REPLY takes no data")) return false;
            break;
          }
          structured_ = true;
          if (!send_reply(option, kRepAck)) return false;
          break;
        case kOptListMetaContext:
        case kOptSetMetaContext:
          // No metadata contexts are offered: an empty answer says so.
          if (!structured_) {
            if (!send_error(option, kRepErrInvalid, "structured replies first")) return false;
            break;
          }
          if (!send_reply(option, kRepAck)) return false;
          break;
        case kOptStartTls:
          if (!send_error(option, kRepErrPolicy, "TLS is not offered")) return false;
          break;
        default:
          if (!send_error(option, kRepErrUnsup, "unsupported option")) return false;
      }
    }
  }

  bool known_export(const std::string& name) const {
    return name.empty() || name == disk().name;
  }

  // NBD_OPT_INFO and NBD_OPT_GO: -1 to close, 0 to go on negotiating, 1 to
  // start transmission.
  int info_or_go(uint32_t option, std::span<const std::byte> data) {
    if (data.size() < 6) return send_error(option, kRepErrInvalid, "short INFO/GO") ? 0 : -1;
    const uint32_t name_length = get_u32(data.data());
    if (name_length > data.size() - 6) {
      return send_error(option, kRepErrInvalid, "name longer than the option") ? 0 : -1;
    }
    const std::string name(reinterpret_cast<const char*>(data.data() + 4), name_length);
    const uint16_t requests = get_u16(data.data() + 4 + name_length);
    if (data.size() != 6 + name_length + 2ULL * requests) {
      return send_error(option, kRepErrInvalid, "INFO/GO length mismatch") ? 0 : -1;
    }
    if (!known_export(name)) {
      return send_error(option, kRepErrUnknown, "no export named '" + name + "'") ? 0 : -1;
    }
    Writer info;
    info.u16(kInfoExport).u64(size()).u16(transmission_flags());
    if (!send_reply(option, kRepInfo, info.data())) return -1;
    Writer block;
    block.u16(kInfoBlockSize).u32(kMinBlock).u32(kPreferredBlock).u32(kMaxBlock);
    if (!send_reply(option, kRepInfo, block.data())) return -1;
    for (uint16_t i = 0; i < requests; ++i) {
      if (get_u16(data.data() + 6 + name_length + 2 * i) == kInfoName) {
        Writer named;
        named.u16(kInfoName).text(disk().name);
        if (!send_reply(option, kRepInfo, named.data())) return -1;
      }
    }
    if (!send_reply(option, kRepAck)) return -1;
    return option == kOptGo ? 1 : 0;
  }

  void transmission() {
    for (;;) {
      std::array<std::byte, kRequestBytes> header;
      if (!read_exact(fd_, header)) return;  // the client went away
      const std::optional<Request> request = parse_request(header);
      if (!request) {
        log(LogLevel::kInfo, "nbd: bad request magic: closing the connection");
        return;
      }
      server_.requests_.fetch_add(1, std::memory_order_relaxed);
      if (request->type == kCmdDisc) return;
      std::vector<std::byte> payload;
      if (request->type == kCmdWrite && request->length > kMaxBlock) {
        // Not worth holding: the bytes are read past, the request refused.
        if (!discard(fd_, request->length)) return;
        finish_error(*request, kEinval, "write longer than the 32 MiB limit");
        continue;
      }
      // What the request makes the server hold: the reply of a read, the
      // payload of a write (longer reads are refused unallocated).
      const bool holds = (request->type == kCmdRead || request->type == kCmdWrite) &&
                         request->length <= kMaxBlock;
      const uint64_t cost = holds ? request->length : 0;
      if (!server_.reserve(&bytes_held_, cost)) return;  // stopping
      if (request->type == kCmdWrite) {
        payload.resize(request->length);
        if (!read_exact(fd_, payload)) {  // vanished mid-request
          server_.release(&bytes_held_, cost);
          return;
        }
      }
      {
        std::lock_guard lock(mu_);
        ++in_flight_;
      }
      server_.workers_.submit([self = shared_from_this(), request = *request, cost,
                               payload = std::move(payload),
                               read_at = std::chrono::steady_clock::now()]() mutable {
        self->handle(request, payload);
        if (ServeObserver* observer = self->server_.observer_) {
          observer->nbd_request(request.type, std::chrono::steady_clock::now() - read_at);
        }
        payload = {};
        self->server_.release(&self->bytes_held_, cost);
        std::lock_guard lock(self->mu_);
        if (--self->in_flight_ == 0) self->idle_.notify_all();
      });
    }
  }

  // The error for a request that does not fit the export, or 0.
  uint32_t check(const Request& request) const {
    const uint16_t known = kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagFastZero;
    if ((request.flags & ~known) != 0) return kEinval;
    switch (request.type) {
      case kCmdRead:
      case kCmdCache:
        if (request.length > kMaxBlock) return structured_ ? kEoverflow : kEinval;
        if (request.offset > size() || request.length > size() - request.offset) return kEinval;
        return 0;
      case kCmdWrite:
      case kCmdTrim:
      case kCmdWriteZeroes:
        if (!writable()) return kEperm;
        if (request.offset > size() || request.length > size() - request.offset) return kEnospc;
        return 0;
      case kCmdFlush:
        return 0;
      default:
        return kEinval;
    }
  }

  void handle(const Request& request, std::span<const std::byte> payload) {
    if (const uint32_t error = check(request); error != 0) {
      finish_error(request, error, fmt::format("request {} at {} of {} bytes refused", request.type,
                                               request.offset, request.length));
      return;
    }
    Status status;
    switch (request.type) {
      case kCmdRead: {
        std::vector<std::byte> data(request.length);
        Result<size_t> got = disk().overlay != nullptr
                                 ? disk().overlay->read_at(data, request.offset)
                                 : disk().device->read_at(data, request.offset);
        if (got && *got != data.size()) got = Status::corruption("short read");
        if (!got) {
          log(LogLevel::kWarn, "nbd: read of {} bytes at {} failed: {}", request.length,
              request.offset, got.status().to_string());
          finish_error(request, nbd_read_error(got.status()), got.status().message());
          return;
        }
        finish_read(request, data);
        return;
      }
      case kCmdWrite:
        status = disk().overlay->write_at(payload, request.offset);
        if (status.is_ok() && (request.flags & kCmdFlagFua)) status = disk().overlay->flush();
        break;
      case kCmdTrim:
        status = disk().overlay->write_zeros(request.offset, request.length);
        break;
      case kCmdWriteZeroes:
        status = disk().overlay->write_zeros(request.offset, request.length);
        if (status.is_ok() && (request.flags & kCmdFlagFua)) status = disk().overlay->flush();
        break;
      case kCmdFlush:
        if (disk().overlay != nullptr) status = disk().overlay->flush();
        break;
      case kCmdCache:
        disk().device->prefetch(request.offset, request.length);
        break;
    }
    if (!status.is_ok()) {
      log(LogLevel::kWarn, "nbd: request {} at {} failed: {}", request.type, request.offset,
          status.to_string());
      finish_error(request, nbd_error(status), status.message());
      return;
    }
    if (structured_) {
      send(structured_header(kReplyFlagDone, kReplyTypeNone, request.cookie, 0));
    } else {
      send(simple_reply(request.cookie, 0));
    }
  }

  void finish_read(const Request& request, std::span<const std::byte> data) {
    std::lock_guard lock(write_mu_);
    if (structured_) {
      Writer chunk;
      chunk.bytes(structured_header(kReplyFlagDone, kReplyTypeOffsetData, request.cookie,
                                    static_cast<uint32_t>(8 + data.size())));
      chunk.u64(request.offset);
      if (write_all(fd_, chunk.data())) write_all(fd_, data);
    } else {
      if (write_all(fd_, simple_reply(request.cookie, 0))) write_all(fd_, data);
    }
  }

  void finish_error(const Request& request, uint32_t error, const std::string& message) {
    if (structured_) {
      const std::string text = message.substr(0, 1024);
      Writer chunk;
      chunk.bytes(structured_header(kReplyFlagDone, kReplyTypeError, request.cookie,
                                    static_cast<uint32_t>(6 + text.size())));
      chunk.u32(error).u16(static_cast<uint16_t>(text.size())).text(text);
      send(chunk.data());
    } else {
      send(simple_reply(request.cookie, error));
    }
  }

  NbdServer& server_;
  const int fd_;
  std::chrono::steady_clock::time_point deadline_;  // of the handshake
  bool no_zeroes_ = false;
  bool structured_ = false;  // set during the handshake, read-only after
  std::mutex write_mu_;      // one reply at a time on the socket

  std::mutex mu_;
  std::condition_variable idle_;
  int in_flight_ = 0;  // guarded by mu_
  uint64_t bytes_held_ = 0;  // guarded by server_.budget_mu_
};

NbdServer::NbdServer(Export disk, ConnectionLimits limits, int workers)
    : export_(std::move(disk)), limits_(limits), workers_(workers) {
  if (::pipe2(wake_, O_CLOEXEC) != 0) wake_[0] = wake_[1] = -1;
}

NbdServer::~NbdServer() {
  stop();
  std::unique_lock lock(mu_);
  all_ended_.wait(lock, [&] { return open_fds_.empty(); });
  lock.unlock();
  for (int fd : wake_) {
    if (fd >= 0) ::close(fd);
  }
}

Status NbdServer::listen_unix(const std::filesystem::path& path) {
  Result<std::unique_ptr<UnixListener>> listener = UnixListener::listen(path);
  if (!listener) return listener.status();
  unix_listener_ = std::move(listener).value();
  listen_fd_ = unix_listener_->fd();
  return Status::ok();
}

Status NbdServer::listen_tcp(const std::string& host, uint16_t port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_port = htons(port);
  if (::inet_pton(AF_INET, host.c_str(), &address.sin_addr) != 1) {
    return Status::invalid_argument(fmt::format("'{}' is not an IPv4 address", host));
  }
  tcp_listener_.reset(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!tcp_listener_) return posix_error("socket", errno);
  listen_fd_ = tcp_listener_.get();
  const int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0) {
    return posix_error(fmt::format("bind {}:{}", host, port), errno);
  }
  if (::listen(listen_fd_, 64) != 0) return posix_error("listen", errno);
  socklen_t length = sizeof address;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&address), &length);
  port_ = ntohs(address.sin_port);
  return Status::ok();
}

Status NbdServer::serve() {
  if (listen_fd_ < 0) return Status::invalid_argument("serve() before listen");
  // One descriptor per connection.
  Acceptor acceptor(listen_fd_, wake_[0],
                    limits_.max_connections > 0 ? limits_.max_connections
                                                : default_max_connections(1),
                    "serve nbd");
  const auto open = [&] {
    std::lock_guard lock(mu_);
    return open_fds_.size();
  };
  while (!stopping_.load()) {
    Result<int> accepted = acceptor.accept(open);
    if (!accepted) return accepted.status();
    if (*accepted < 0) break;  // stop()
    const int fd = *accepted;
    const int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);  // fails harmlessly on Unix sockets
    {
      std::lock_guard lock(mu_);
      open_fds_.insert(fd);
    }
    connections_.fetch_add(1);
    auto session = std::make_shared<Session>(*this, fd);
    try {
      std::thread([session] { session->run(); }).detach();
    } catch (const std::system_error& error) {
      // Out of threads: this connection is refused; the server goes on.
      log(LogLevel::kWarn, "serve nbd: refused a connection: no thread for it ({})", error.what());
      session_ended(fd);
    }
  }
  std::unique_lock lock(mu_);
  if (!all_ended_.wait_for(lock, kReplyGrace, [&] { return open_fds_.empty(); })) {
    for (int fd : open_fds_) ::shutdown(fd, SHUT_RDWR);
  }
  all_ended_.wait(lock, [&] { return open_fds_.empty(); });
  return Status::ok();
}

void NbdServer::stop() {
  if (stopping_.exchange(true)) return;
  if (wake_[1] >= 0) {
    const char byte = 1;
    (void)!::write(wake_[1], &byte, 1);
  }
  // Wake every connection's reader: it sees the end and finishes up. The
  // write side stays open for a while (see serve()), so that requests in
  // flight still get their replies, errors if their fetches were cancelled.
  {
    std::lock_guard lock(mu_);
    for (int fd : open_fds_) ::shutdown(fd, SHUT_RD);
  }
  // Readers waiting for the reply budget end too.
  { std::lock_guard lock(budget_mu_); }
  budget_freed_.notify_all();
}

bool NbdServer::reserve(uint64_t* held, uint64_t bytes) {
  if (bytes == 0) return !stopping_.load();
  std::unique_lock lock(budget_mu_);
  budget_freed_.wait(lock, [&] {
    return stopping_.load() || (*held == 0 && bytes <= kAlwaysAdmitted) ||
           (*held + bytes <= kConnectionBytesInFlight &&
            bytes_in_flight_ + bytes <= kTotalBytesInFlight);
  });
  if (stopping_.load()) return false;
  *held += bytes;
  bytes_in_flight_ += bytes;
  return true;
}

void NbdServer::release(uint64_t* held, uint64_t bytes) {
  if (bytes == 0) return;
  {
    std::lock_guard lock(budget_mu_);
    *held -= bytes;
    bytes_in_flight_ -= bytes;
  }
  budget_freed_.notify_all();
}

void NbdServer::session_ended(int fd) {
  // Closed under the lock: stop() must never shut down a descriptor that
  // has been closed and reused.
  std::lock_guard lock(mu_);
  open_fds_.erase(fd);
  ::close(fd);
  if (open_fds_.empty()) all_ended_.notify_all();
}

}  // namespace lazyblock::nbd
