// libFuzzer target: what a UFFD handler reads from outside: Firecracker's
// region mappings (JSON off the socket) and page records (a file or an
// object). Whatever parse_guest_regions accepts must be regions a fault can
// be served in: aligned, sorted, disjoint, inside the memfile; whatever
// parse_page_record accepts must format back to a record that parses the same.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "serve/uffd/guest_regions.h"
#include "serve/uffd/page_record.h"

namespace {

constexpr uint64_t kMemfileSize = 1ULL << 30;

void check_regions(std::string_view text) {
  lazyblock::Result<std::vector<lazyblock::uffd::GuestRegion>> regions =
      lazyblock::uffd::parse_guest_regions(text, kMemfileSize);
  if (!regions) return;
  uint64_t previous_end = 0;
  for (const lazyblock::uffd::GuestRegion& r : *regions) {
    if (r.page_size != 4096 && r.page_size != (2u << 20)) std::abort();
    if (r.size == 0 || r.base % r.page_size || r.size % r.page_size || r.offset % r.page_size) {
      std::abort();
    }
    if (r.offset + r.size > kMemfileSize || r.base < previous_end) std::abort();
    if (lazyblock::uffd::region_at(*regions, r.base) != &r) std::abort();
    if (lazyblock::uffd::region_at(*regions, r.end() - 1) != &r) std::abort();
    previous_end = r.end();
  }
}

void check_record(std::string_view text) {
  lazyblock::Result<std::vector<lazyblock::uffd::PageRun>> runs =
      lazyblock::uffd::parse_page_record(text);
  if (!runs) return;
  lazyblock::Result<std::vector<lazyblock::uffd::PageRun>> again =
      lazyblock::uffd::parse_page_record(lazyblock::uffd::format_page_record(*runs));
  if (!again || *again != *runs) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  // The first byte picks the parser; the rest is its input.
  const std::string_view text(reinterpret_cast<const char*>(data) + 1, size - 1);
  if (data[0] & 1) {
    check_record(text);
  } else {
    check_regions(text);
  }
  return 0;
}
