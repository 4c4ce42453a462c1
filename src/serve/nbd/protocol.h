// The NBD protocol's wire format (the fixed-newstyle handshake and the
// transmission phase), as the NBD project's doc/proto.md defines it: magic
// numbers, options, commands, flags, errors, and the encoding of the
// messages lazyblock's server reads and writes. Big-endian on the wire.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

namespace lazyblock::nbd {

// Handshake.
constexpr uint64_t kNbdMagic = 0x4e42444d41474943;     // "NBDMAGIC"
constexpr uint64_t kOptionMagic = 0x49484156454F5054;  // "IHAVEOPT"
constexpr uint64_t kReplyMagic = 0x3e889045565a9;      // option replies
constexpr uint16_t kFlagFixedNewstyle = 1;
constexpr uint16_t kFlagNoZeroes = 2;
constexpr uint32_t kClientFlagFixedNewstyle = 1;
constexpr uint32_t kClientFlagNoZeroes = 2;

enum Option : uint32_t {
  kOptExportName = 1,
  kOptAbort = 2,
  kOptList = 3,
  kOptStartTls = 5,
  kOptInfo = 6,
  kOptGo = 7,
  kOptStructuredReply = 8,
  kOptListMetaContext = 9,
  kOptSetMetaContext = 10,
};

enum OptionReply : uint32_t {
  kRepAck = 1,
  kRepServer = 2,
  kRepInfo = 3,
  kRepMetaContext = 4,
  kRepErrUnsup = 0x80000001,
  kRepErrPolicy = 0x80000002,
  kRepErrInvalid = 0x80000003,
  kRepErrUnknown = 0x80000006,
  kRepErrTooBig = 0x80000009,
};

enum Info : uint16_t {
  kInfoExport = 0,
  kInfoName = 1,
  kInfoDescription = 2,
  kInfoBlockSize = 3,
};

// Transmission flags (per export).
constexpr uint16_t kFlagHasFlags = 1 << 0;
constexpr uint16_t kFlagReadOnly = 1 << 1;
constexpr uint16_t kFlagSendFlush = 1 << 2;
constexpr uint16_t kFlagSendFua = 1 << 3;
constexpr uint16_t kFlagSendTrim = 1 << 5;
constexpr uint16_t kFlagSendWriteZeroes = 1 << 6;
constexpr uint16_t kFlagCanMultiConn = 1 << 8;
constexpr uint16_t kFlagSendCache = 1 << 10;

// Requests.
constexpr uint32_t kRequestMagic = 0x25609513;
constexpr uint32_t kSimpleReplyMagic = 0x67446698;
constexpr uint32_t kStructuredReplyMagic = 0x668e33ef;
constexpr size_t kRequestBytes = 28;

enum Command : uint16_t {
  kCmdRead = 0,
  kCmdWrite = 1,
  kCmdDisc = 2,
  kCmdFlush = 3,
  kCmdTrim = 4,
  kCmdCache = 5,
  kCmdWriteZeroes = 6,
  kCmdBlockStatus = 7,
};

constexpr uint16_t kCmdFlagFua = 1 << 0;
constexpr uint16_t kCmdFlagNoHole = 1 << 1;
constexpr uint16_t kCmdFlagDf = 1 << 2;
constexpr uint16_t kCmdFlagReqOne = 1 << 3;
constexpr uint16_t kCmdFlagFastZero = 1 << 4;

// Structured reply chunks.
constexpr uint16_t kReplyFlagDone = 1;
constexpr uint16_t kReplyTypeNone = 0;
constexpr uint16_t kReplyTypeOffsetData = 1;
constexpr uint16_t kReplyTypeBlockStatus = 5;
constexpr uint16_t kReplyTypeError = (1 << 15) + 1;

// The one metadata context offered (NBD_OPT_SET_META_CONTEXT), its id in
// block status replies, and its flags.
constexpr const char* kAllocationContext = "base:allocation";
constexpr uint32_t kAllocationContextId = 1;
constexpr uint32_t kStateHole = 1 << 0;
constexpr uint32_t kStateZero = 1 << 1;

// Errors (errno values fixed by the protocol).
enum Error : uint32_t {
  kEperm = 1,
  kEio = 5,
  kEnomem = 12,
  kEinval = 22,
  kEnospc = 28,
  kEoverflow = 75,
  kEnotsup = 95,
  kEshutdown = 108,
};

// Block sizes the server advertises: any byte is addressable, 4 KiB is
// best, and no request may exceed 32 MiB.
constexpr uint32_t kMinBlock = 1;
constexpr uint32_t kPreferredBlock = 4096;
constexpr uint32_t kMaxBlock = 32 * 1024 * 1024;

struct Request {
  uint16_t flags = 0;
  uint16_t type = 0;
  uint64_t cookie = 0;
  uint64_t offset = 0;
  uint32_t length = 0;
};

// The request in a 28-byte header; nullopt if its magic is wrong (a
// protocol error: the connection cannot be trusted to be in step).
std::optional<Request> parse_request(std::span<const std::byte, kRequestBytes> bytes);

// Big-endian encoding of the messages.
class Writer {
 public:
  Writer& u16(uint16_t value);
  Writer& u32(uint32_t value);
  Writer& u64(uint64_t value);
  Writer& bytes(std::span<const std::byte> data);
  Writer& text(const std::string& data);
  const std::vector<std::byte>& data() const { return data_; }

 private:
  std::vector<std::byte> data_;
};

uint16_t get_u16(const std::byte* at);
uint32_t get_u32(const std::byte* at);
uint64_t get_u64(const std::byte* at);

// An option reply: magic, option, type, length, then `payload`.
std::vector<std::byte> option_reply(uint32_t option, uint32_t type,
                                    std::span<const std::byte> payload = {});
// A simple reply's 16-byte header.
std::vector<std::byte> simple_reply(uint64_t cookie, uint32_t error);
// A structured reply chunk's 20-byte header (the payload follows).
std::vector<std::byte> structured_header(uint16_t flags, uint16_t type, uint64_t cookie,
                                         uint32_t length);

}  // namespace lazyblock::nbd
