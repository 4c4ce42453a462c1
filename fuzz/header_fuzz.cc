// libFuzzer target: image::Header::parse on arbitrary bytes. Whatever it
// accepts must be a valid header that writes back to the very same bytes.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "image/header.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  lazyblock::Result<lazyblock::image::Header> header = lazyblock::image::Header::parse(bytes);
  if (!header) return 0;
  if (!header->validate().is_ok()) std::abort();
  lazyblock::Result<std::vector<std::byte>> written = header->serialize();
  if (!written || written->size() != size ||
      !std::equal(written->begin(), written->end(), bytes.begin())) {
    std::abort();
  }
  if (!header->mappings.empty()) {
    // Every device byte maps into the mapping that holds it.
    const uint64_t last = header->size == 0 ? 0 : header->size - 1;
    const auto& m = header->mappings[header->mapping_at(last)];
    if (last < m.offset || last >= m.end()) std::abort();
  }
  return 0;
}
