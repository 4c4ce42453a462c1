#include "serve/nbd/session.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <vector>

#include <fmt/format.h>

#include "common/log.h"

namespace lazyblock::nbd {
namespace {

// Option payloads beyond this are refused unread (names are at most 4 KiB).
constexpr uint32_t kMaxOptionBytes = 64 * 1024;

// A write's payload buffer grows by this much as its bytes arrive, so that
// a client announcing 32 MiB and sending less costs no 32 MiB.
constexpr size_t kPayloadStep = 64 * 1024;
// Reads up to this size use their worker's kept buffer; larger ones (up to
// kMaxBlock) get one of their own.
constexpr uint32_t kKeptReadBuffer = 1024 * 1024;

// The NBD error for a failed request: a full disk is ENOSPC (the guest's
// file system sees a full disk, not a broken one).
uint32_t nbd_error(const Status& status) {
  switch (status.code()) {
    case StatusCode::kInvalidArgument:
      return kEinval;
    case StatusCode::kNoSpace:
      return kEnospc;
    case StatusCode::kCancelled:
      return kEshutdown;
    default:
      return kEio;
  }
}

// A failed read: ESHUTDOWN if the server is stopping, else EIO.
uint32_t nbd_read_error(const Status& status) {
  return status.code() == StatusCode::kCancelled ? kEshutdown : kEio;
}

std::string as_string(std::span<const std::byte> bytes) {
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

}  // namespace

Session::Session(const Export& disk, Transport& transport, RequestRunner& runner,
                 std::atomic<uint64_t>& requests, ServeObserver* observer)
    : export_(disk),
      disk_(disk.disk),
      transport_(transport),
      runner_(runner),
      requests_(requests),
      observer_(observer) {}

bool Session::run() {
  const bool agreed = handshake();
  if (agreed) {
    transport_.handshake_done();
    transmission();
  }
  // Replies still being made need the transport; wait for them.
  MutexLock lock(mu_);
  idle_.wait(lock, [&]() REQUIRES(mu_) { return in_flight_ == 0; });
  return agreed;
}

uint16_t Session::transmission_flags() const {
  uint16_t flags = kFlagHasFlags | kFlagSendFlush | kFlagSendCache | kFlagCanMultiConn;
  if (disk_.writable()) {
    flags |= kFlagSendFua | kFlagSendTrim | kFlagSendWriteZeroes;
  } else {
    flags |= kFlagReadOnly;
  }
  return flags;
}

bool Session::send(std::span<const std::byte> data) {
  MutexLock lock(write_mu_);
  return transport_.write(data);
}

bool Session::send_reply(uint32_t option, uint32_t type, std::span<const std::byte> payload) {
  return transport_.write(option_reply(option, type, payload));
}

bool Session::send_error(uint32_t option, uint32_t type, const std::string& message) {
  return send_reply(option, type, std::as_bytes(std::span(message.data(), message.size())));
}

bool Session::discard(uint64_t length) {
  std::byte scratch[65536];
  while (length > 0) {
    const size_t take = static_cast<size_t>(std::min<uint64_t>(length, sizeof scratch));
    if (!transport_.read(std::span(scratch, take))) return false;
    length -= take;
  }
  return true;
}

bool Session::known_export(const std::string& name) const {
  return name.empty() || name == export_.name;
}

bool Session::handshake() {
  Writer greeting;
  greeting.u64(kNbdMagic).u64(kOptionMagic).u16(kFlagFixedNewstyle | kFlagNoZeroes);
  if (!transport_.write(greeting.data())) return false;
  std::byte flags_bytes[4];
  if (!transport_.read(flags_bytes)) return false;
  const uint32_t client_flags = get_u32(flags_bytes);
  if ((client_flags & ~(kClientFlagFixedNewstyle | kClientFlagNoZeroes)) != 0) {
    log(LogLevel::kInfo, "nbd: a client asked for unknown flags {:#x}: closing", client_flags);
    return false;
  }
  no_zeroes_ = (client_flags & kClientFlagNoZeroes) != 0;
  for (;;) {
    std::byte header[16];
    if (!transport_.read(header)) return false;
    if (get_u64(header) != kOptionMagic) {
      log(LogLevel::kInfo, "nbd: bad option magic: closing");
      return false;
    }
    const uint32_t option = get_u32(header + 8);
    const uint32_t length = get_u32(header + 12);
    if (length > kMaxOptionBytes) {
      if (!discard(length)) return false;
      if (!send_error(option, kRepErrTooBig, "option data too large")) return false;
      continue;
    }
    std::vector<std::byte> data(length);
    if (!transport_.read(data)) return false;
    switch (option) {
      case kOptExportName: {
        if (!known_export(as_string(data))) return false;  // this option has no error reply
        Writer reply;
        reply.u64(disk_.size()).u16(transmission_flags());
        if (!no_zeroes_) reply.bytes(std::vector<std::byte>(124));
        return transport_.write(reply.data());
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
        server.u32(static_cast<uint32_t>(export_.name.size())).text(export_.name);
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
        if (!meta_context(option, data)) return false;
        break;
      case kOptStartTls:
        if (!send_error(option, kRepErrPolicy, "TLS is not offered")) return false;
        break;
      default:
        if (!send_error(option, kRepErrUnsup, "unsupported option")) return false;
    }
  }
}

int Session::info_or_go(uint32_t option, std::span<const std::byte> data) {
  if (data.size() < 6) return send_error(option, kRepErrInvalid, "short INFO/GO") ? 0 : -1;
  const uint32_t name_length = get_u32(data.data());
  if (name_length > data.size() - 6) {
    return send_error(option, kRepErrInvalid, "name longer than the option") ? 0 : -1;
  }
  const std::string name = as_string(data.subspan(4, name_length));
  const uint16_t requests = get_u16(data.data() + 4 + name_length);
  if (data.size() != 6 + name_length + 2ULL * requests) {
    return send_error(option, kRepErrInvalid, "INFO/GO length mismatch") ? 0 : -1;
  }
  if (!known_export(name)) {
    return send_error(option, kRepErrUnknown, "no export named '" + name + "'") ? 0 : -1;
  }
  Writer info;
  info.u16(kInfoExport).u64(disk_.size()).u16(transmission_flags());
  if (!send_reply(option, kRepInfo, info.data())) return -1;
  Writer block;
  block.u16(kInfoBlockSize).u32(kMinBlock).u32(kPreferredBlock).u32(kMaxBlock);
  if (!send_reply(option, kRepInfo, block.data())) return -1;
  for (uint16_t i = 0; i < requests; ++i) {
    if (get_u16(data.data() + 6 + name_length + 2 * i) == kInfoName) {
      Writer named;
      named.u16(kInfoName).text(export_.name);
      if (!send_reply(option, kRepInfo, named.data())) return -1;
    }
  }
  if (!send_reply(option, kRepAck)) return -1;
  return option == kOptGo ? 1 : 0;
}

bool Session::meta_context(uint32_t option, std::span<const std::byte> data) {
  // Metadata contexts describe structured replies' block status: they need those first.
  if (!structured_) return send_error(option, kRepErrInvalid, "structured replies first");
  // u32 name length, name, u32 query count, then each query as u32 length, string.
  const auto invalid = [&](const char* why) { return send_error(option, kRepErrInvalid, why); };
  if (data.size() < 4) return invalid("short meta context option");
  const uint32_t name_length = get_u32(data.data());
  if (name_length > data.size() - 4 || data.size() - 4 - name_length < 4) {
    return invalid("meta context option shorter than its export name");
  }
  const std::string name = as_string(data.subspan(4, name_length));
  std::span<const std::byte> rest = data.subspan(4 + name_length);
  const uint32_t queries = get_u32(rest.data());
  rest = rest.subspan(4);
  // Whether the queries name base:allocation (LIST: with no query, or with
  // the namespace alone, too).
  bool allocation = option == kOptListMetaContext && queries == 0;
  for (uint32_t i = 0; i < queries; ++i) {
    if (rest.size() < 4) return invalid("meta context queries longer than the option");
    const uint32_t length = get_u32(rest.data());
    if (length > rest.size() - 4) return invalid("meta context query longer than the option");
    const std::string query = as_string(rest.subspan(4, length));
    rest = rest.subspan(4 + length);
    if (query == kAllocationContext || (option == kOptListMetaContext && query == "base:")) {
      allocation = true;
    }
  }
  if (!rest.empty()) return invalid("meta context option longer than its queries");
  if (!known_export(name)) {
    return send_error(option, kRepErrUnknown, "no export named '" + name + "'");
  }
  // SET replaces the selection; LIST's ids are not for use (zero).
  if (option == kOptSetMetaContext) allocation_context_ = allocation;
  if (allocation) {
    Writer context;
    context.u32(option == kOptSetMetaContext ? kAllocationContextId : 0).text(kAllocationContext);
    if (!send_reply(option, kRepMetaContext, context.data())) return false;
  }
  return send_reply(option, kRepAck);
}

void Session::transmission() {
  for (;;) {
    std::array<std::byte, kRequestBytes> header;
    if (!transport_.read(header)) return;  // the client went away
    const std::optional<Request> request = parse_request(header);
    if (!request) {
      log(LogLevel::kInfo, "nbd: bad request magic: closing the connection");
      return;
    }
    requests_.fetch_add(1, std::memory_order_relaxed);
    if (request->type == kCmdDisc) return;
    if (request->type == kCmdWrite && request->length > kMaxBlock) {
      // Not worth holding: the bytes are read past, the request refused.
      if (!discard(request->length)) return;
      finish_error(*request, kEinval, "write longer than the 32 MiB limit");
      continue;
    }
    // What the request makes the server hold: the reply of a read, the
    // payload of a write (longer reads are refused unallocated).
    const bool holds =
        (request->type == kCmdRead || request->type == kCmdWrite) && request->length <= kMaxBlock;
    const uint64_t cost = holds ? request->length : 0;
    if (!runner_.admit(cost)) return;  // stopping
    std::vector<std::byte> payload;
    if (request->type == kCmdWrite) {
      while (payload.size() < request->length) {
        const size_t from = payload.size();
        payload.resize(std::min<size_t>(request->length, from + kPayloadStep));
        if (!transport_.read(std::span(payload).subspan(from))) {  // vanished mid-request
          runner_.release(cost);
          return;
        }
      }
    }
    {
      MutexLock lock(mu_);
      ++in_flight_;
    }
    runner_.run([this, request = *request, cost, payload = std::move(payload),
                 read_at = std::chrono::steady_clock::now()]() mutable {
      handle(request, payload);
      if (observer_ != nullptr) {
        observer_->nbd_request(request.type, std::chrono::steady_clock::now() - read_at);
      }
      payload = {};
      runner_.release(cost);
      MutexLock lock(mu_);
      if (--in_flight_ == 0) idle_.notify_all();
    });
  }
}

uint32_t Session::check(const Request& request) const {
  const uint16_t known =
      kCmdFlagFua | kCmdFlagNoHole | kCmdFlagDf | kCmdFlagReqOne | kCmdFlagFastZero;
  if ((request.flags & ~known) != 0) return kEinval;
  const uint64_t size = disk_.size();
  const bool in_range = request.offset <= size && request.length <= size - request.offset;
  switch (request.type) {
    case kCmdRead:
    case kCmdCache:
      if (request.length > kMaxBlock) return structured_ ? kEoverflow : kEinval;
      return in_range ? 0u : uint32_t{kEinval};
    case kCmdWrite:
    case kCmdTrim:
    case kCmdWriteZeroes:
      if (!disk_.writable()) return kEperm;
      return in_range ? 0u : uint32_t{kEnospc};
    case kCmdFlush:
      return 0;
    case kCmdBlockStatus:
      if (!allocation_context_ || request.length == 0) return kEinval;
      return in_range ? 0u : uint32_t{kEinval};
    default:
      return kEinval;
  }
}

void Session::handle(const Request& request, std::span<const std::byte> payload) {
  if (const uint32_t error = check(request); error != 0) {
    finish_error(request, error,
                 fmt::format("request {} at {} of {} bytes refused", request.type, request.offset,
                             request.length));
    return;
  }
  Status status;
  switch (request.type) {
    case kCmdRead: {
      // A worker keeps its read buffer: a new one per read is new memory each
      // time, whose first touch costs ~14 us a page on a VM. (Not zeroed
      // first: the read fills it whole or fails.)
      thread_local std::unique_ptr<std::byte[]> kept;
      std::unique_ptr<std::byte[]> once;
      if (request.length > kKeptReadBuffer) {
        once = std::make_unique_for_overwrite<std::byte[]>(request.length);
      } else if (!kept) {
        kept = std::make_unique_for_overwrite<std::byte[]>(kKeptReadBuffer);
      }
      const std::span<std::byte> data(once ? once.get() : kept.get(), request.length);
      Result<size_t> got = disk_.read(data, request.offset);
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
    case kCmdBlockStatus:
      block_status(request);
      return;
    case kCmdWrite:
      status = disk_.write(payload, request.offset);
      if (status.is_ok() && (request.flags & kCmdFlagFua)) status = disk_.flush();
      break;
    case kCmdTrim:
      status = disk_.trim(request.offset, request.length);
      break;
    case kCmdWriteZeroes:
      status = disk_.write_zeroes(request.offset, request.length);
      if (status.is_ok() && (request.flags & kCmdFlagFua)) status = disk_.flush();
      break;
    case kCmdFlush:
      status = disk_.flush();
      break;
    case kCmdCache:
      disk_.prefetch(request.offset, request.length);
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

void Session::block_status(const Request& request) {
  Result<std::vector<image::DiskExtent>> extents = disk_.extents(request.offset, request.length);
  if (!extents) {
    log(LogLevel::kWarn, "nbd: block status of {} bytes at {} failed: {}", request.length,
        request.offset, extents.status().to_string());
    finish_error(request, nbd_error(extents.status()), extents.status().message());
    return;
  }
  // Neighbours of one kind are one descriptor; each fits in 32 bits, as
  // the request's length does.
  std::vector<std::pair<uint32_t, uint32_t>> descriptors;  // length, flags
  image::DiskExtent::Kind last_kind{};
  for (const image::DiskExtent& extent : *extents) {
    if (!descriptors.empty() && extent.kind == last_kind) {
      descriptors.back().first += static_cast<uint32_t>(extent.length);
      continue;
    }
    if ((request.flags & kCmdFlagReqOne) && !descriptors.empty()) break;
    descriptors.emplace_back(
        static_cast<uint32_t>(extent.length),
        extent.kind == image::DiskExtent::Kind::kZero ? kStateHole | kStateZero : 0u);
    last_kind = extent.kind;
  }
  Writer chunk;
  chunk.bytes(structured_header(kReplyFlagDone, kReplyTypeBlockStatus, request.cookie,
                                static_cast<uint32_t>(4 + 8 * descriptors.size())));
  chunk.u32(kAllocationContextId);
  for (const auto& [length, flags] : descriptors) chunk.u32(length).u32(flags);
  send(chunk.data());
}

void Session::finish_read(const Request& request, std::span<const std::byte> data) {
  MutexLock lock(write_mu_);
  if (structured_) {
    Writer chunk;
    chunk.bytes(structured_header(kReplyFlagDone, kReplyTypeOffsetData, request.cookie,
                                  static_cast<uint32_t>(8 + data.size())));
    chunk.u64(request.offset);
    if (transport_.write(chunk.data())) transport_.write(data);
  } else {
    if (transport_.write(simple_reply(request.cookie, 0))) transport_.write(data);
  }
}

void Session::finish_error(const Request& request, uint32_t error, const std::string& message) {
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

}  // namespace lazyblock::nbd
