#include "serve/nbd/nbd_server.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "common/log.h"
#include "common/unix_socket.h"
#include "serve/nbd/protocol.h"

namespace lazyblock::nbd {
namespace {

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

// A connection's socket as a session's transport. During the handshake,
// reads and writes give up at its deadline: a client that is silent, or
// trickles, or does not read the replies, is closed when it runs out.
class SocketTransport final : public Transport {
 public:
  SocketTransport(int fd, std::chrono::milliseconds handshake_timeout)
      : fd_(fd),
        timeout_(handshake_timeout),
        deadline_(std::chrono::steady_clock::now() + handshake_timeout) {
    set_send_timeout(timeout_);
  }

  bool read(std::span<std::byte> buffer) override {
    size_t done = 0;
    while (done < buffer.size()) {
      if (deadline_) {
        const auto left = std::chrono::ceil<std::chrono::milliseconds>(
            *deadline_ - std::chrono::steady_clock::now());
        if (left.count() <= 0) return timed_out();
        pollfd ready{fd_, POLLIN, 0};
        const int polled = ::poll(&ready, 1, static_cast<int>(left.count()));
        if (polled < 0 && errno == EINTR) continue;
        if (polled == 0) return timed_out();
        if (polled < 0) return false;
      }
      const ssize_t got = ::recv(fd_, buffer.data() + done, buffer.size() - done, 0);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) return false;
      done += static_cast<size_t>(got);
    }
    return true;
  }

  bool write(std::span<const std::byte> data) override {
    size_t done = 0;
    while (done < data.size()) {
      // MSG_NOSIGNAL: a client that went away is an error here, not a SIGPIPE.
      const ssize_t put = ::send(fd_, data.data() + done, data.size() - done, MSG_NOSIGNAL);
      if (put < 0 && errno == EINTR) continue;
      if (put <= 0) {
        if (deadline_ && std::chrono::steady_clock::now() >= *deadline_) return timed_out();
        return false;
      }
      done += static_cast<size_t>(put);
    }
    return true;
  }

  void handshake_done() override {
    // Replies may wait on a slow client as long as it likes from now on.
    deadline_.reset();
    set_send_timeout(std::chrono::milliseconds(0));
  }

 private:
  bool timed_out() {
    if (!reported_) {
      reported_ = true;
      log(LogLevel::kInfo, "nbd: a client did not finish its handshake within {} ms: closing",
          timeout_.count());
    }
    return false;
  }

  void set_send_timeout(std::chrono::milliseconds timeout) {
    timeval send_timeout{static_cast<time_t>(timeout.count() / 1000),
                         static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
    ::setsockopt(fd_, SOL_SOCKET, SO_SNDTIMEO, &send_timeout, sizeof send_timeout);
  }

  const int fd_;
  const std::chrono::milliseconds timeout_;
  std::optional<std::chrono::steady_clock::time_point> deadline_;  // of the handshake
  bool reported_ = false;
};

}  // namespace

// One connection's requests on the server's workers, within its share of
// the reply budget.
class NbdServer::Runner final : public RequestRunner {
 public:
  explicit Runner(NbdServer& server) : server_(server) {}
  bool admit(uint64_t bytes) override { return server_.reserve(&held_, bytes); }
  void release(uint64_t bytes) override { server_.release(&held_, bytes); }
  void run(std::function<void()> request) override { server_.workers_->submit(std::move(request)); }

 private:
  NbdServer& server_;
  uint64_t held_ GUARDED_BY(server_.budget_mu_) = 0;
};

void NbdServer::serve_connection(int fd) {
  SocketTransport transport(fd, limits_.handshake_timeout);
  Runner runner(*this);
  Session session(export_, transport, runner, requests_, observer_);
  session.run();
}

NbdServer::NbdServer(Export disk, ConnectionLimits limits, int workers)
    : NbdServer(std::move(disk), limits, nullptr) {
  own_workers_ = std::make_unique<WorkerPool>(workers);
  workers_ = own_workers_.get();
}

NbdServer::NbdServer(Export disk, ConnectionLimits limits, WorkerPool& workers)
    : NbdServer(std::move(disk), limits, &workers) {}

NbdServer::NbdServer(Export disk, ConnectionLimits limits, WorkerPool* workers)
    : export_(std::move(disk)), limits_(limits), workers_(workers) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) == 0) {
    wake_read_.reset(pipe_fds[0]);
    wake_write_.reset(pipe_fds[1]);
  }
}

NbdServer::~NbdServer() {
  stop();
  sessions_.join_all();
}

Status NbdServer::listen_unix(const std::filesystem::path& path) {
  Result<std::unique_ptr<UnixListener>> listener = UnixListener::listen(path);
  if (!listener) return listener.status();
  unix_listener_ = std::move(listener).value();
  listen_fd_ = unix_listener_->fd();
  return Status::ok();
}

Status NbdServer::listen_tcp(const std::string& host, uint16_t port) {
  // An IPv4 or IPv6 address, or a name (localhost): its first address.
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port);
  if (const int error = ::getaddrinfo(host.c_str(), service.c_str(), &hints, &found); error != 0) {
    return Status::invalid_argument(
        fmt::format("cannot listen on '{}': {}", host, ::gai_strerror(error)));
  }
  const std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> addresses(found, &::freeaddrinfo);
  tcp_listener_.reset(::socket(found->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!tcp_listener_) return posix_error("socket", errno);
  listen_fd_ = tcp_listener_.get();
  const int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (::bind(listen_fd_, found->ai_addr, found->ai_addrlen) != 0) {
    return posix_error(fmt::format("bind {}:{}", host, port), errno);
  }
  if (::listen(listen_fd_, 64) != 0) return posix_error("listen", errno);
  sockaddr_storage bound{};
  socklen_t length = sizeof bound;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&bound), &length);
  port_ = ntohs(bound.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port
                                            : reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
  return Status::ok();
}

Status NbdServer::serve() {
  if (listen_fd_ < 0) return Status::invalid_argument("serve() before listen");
  // One descriptor per connection.
  Acceptor acceptor(
      listen_fd_, wake_read_.get(),
      limits_.max_connections > 0 ? limits_.max_connections : default_max_connections(1),
      "serve nbd");
  const auto open = [&] { return sessions_.live(); };
  while (!stopping_.load()) {
    Result<UniqueFd> accepted = acceptor.accept(open);
    if (!accepted) return accepted.status();
    if (!*accepted) break;  // stop()
    const int one = 1;
    // Fails harmlessly on Unix sockets.
    ::setsockopt(accepted->get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    connections_.fetch_add(1);
    sessions_.start(std::move(*accepted), [this](int fd) { serve_connection(fd); });
  }
  if (!sessions_.wait_ended(kReplyGrace)) sessions_.shutdown_all(SHUT_RDWR);
  sessions_.join_all();
  return Status::ok();
}

void NbdServer::stop() {
  if (stopping_.exchange(true)) return;
  if (wake_write_) {
    const char byte = 1;
    (void)!::write(wake_write_.get(), &byte, 1);
  }
  // Wake every connection's reader: it sees the end and finishes up. The
  // write side stays open for a while (see serve()), so that requests in
  // flight still get their replies, errors if their fetches were cancelled.
  sessions_.shutdown_all(SHUT_RD);
  // Readers waiting for the reply budget end too.
  { MutexLock lock(budget_mu_); }
  budget_freed_.notify_all();
}

bool NbdServer::reserve(uint64_t* held, uint64_t bytes) {
  if (bytes == 0) return !stopping_.load();
  MutexLock lock(budget_mu_);
  budget_freed_.wait(lock, [&]() REQUIRES(budget_mu_) {
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
    MutexLock lock(budget_mu_);
    *held -= bytes;
    bytes_in_flight_ -= bytes;
  }
  budget_freed_.notify_all();
}

}  // namespace lazyblock::nbd
