#include "serve/nbd/protocol.h"

namespace lazyblock::nbd {

uint16_t get_u16(const std::byte* at) {
  return static_cast<uint16_t>(static_cast<uint16_t>(at[0]) << 8 | static_cast<uint16_t>(at[1]));
}
uint32_t get_u32(const std::byte* at) {
  return static_cast<uint32_t>(get_u16(at)) << 16 | get_u16(at + 2);
}
uint64_t get_u64(const std::byte* at) {
  return static_cast<uint64_t>(get_u32(at)) << 32 | get_u32(at + 4);
}

std::optional<Request> parse_request(std::span<const std::byte, kRequestBytes> bytes) {
  if (get_u32(bytes.data()) != kRequestMagic) return std::nullopt;
  Request request;
  request.flags = get_u16(bytes.data() + 4);
  request.type = get_u16(bytes.data() + 6);
  request.cookie = get_u64(bytes.data() + 8);
  request.offset = get_u64(bytes.data() + 16);
  request.length = get_u32(bytes.data() + 24);
  return request;
}

Writer& Writer::u16(uint16_t value) {
  data_.push_back(static_cast<std::byte>(value >> 8));
  data_.push_back(static_cast<std::byte>(value));
  return *this;
}
Writer& Writer::u32(uint32_t value) {
  u16(static_cast<uint16_t>(value >> 16));
  return u16(static_cast<uint16_t>(value));
}
Writer& Writer::u64(uint64_t value) {
  u32(static_cast<uint32_t>(value >> 32));
  return u32(static_cast<uint32_t>(value));
}
Writer& Writer::bytes(std::span<const std::byte> data) {
  data_.insert(data_.end(), data.begin(), data.end());
  return *this;
}
Writer& Writer::text(const std::string& data) {
  return bytes(std::as_bytes(std::span(data.data(), data.size())));
}

std::vector<std::byte> option_reply(uint32_t option, uint32_t type,
                                    std::span<const std::byte> payload) {
  Writer out;
  out.u64(kReplyMagic).u32(option).u32(type).u32(static_cast<uint32_t>(payload.size()));
  out.bytes(payload);
  return out.data();
}

std::vector<std::byte> simple_reply(uint64_t cookie, uint32_t error) {
  Writer out;
  out.u32(kSimpleReplyMagic).u32(error).u64(cookie);
  return out.data();
}

std::vector<std::byte> structured_header(uint16_t flags, uint16_t type, uint64_t cookie,
                                         uint32_t length) {
  Writer out;
  out.u32(kStructuredReplyMagic).u16(flags).u16(type).u64(cookie).u32(length);
  return out.data();
}

}  // namespace lazyblock::nbd
