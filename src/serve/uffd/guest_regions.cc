#include "serve/uffd/guest_regions.h"

#include <algorithm>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/units.h"

namespace lazyblock::uffd {
namespace {

constexpr uint64_t kSmallPage = 4096;
constexpr uint64_t kHugePage = 2 * kMiB;

// Reads the non-negative integer `name` of region `index` into `value`.
Status read_field(const nlohmann::json& region, size_t index, const char* name, uint64_t* value) {
  const auto it = region.find(name);
  if (it == region.end()) {
    return Status::invalid_argument(fmt::format("region {} has no '{}'", index, name));
  }
  if (!it->is_number_unsigned()) {
    return Status::invalid_argument(
        fmt::format("region {}: '{}' is not a non-negative integer", index, name));
  }
  *value = it->get<uint64_t>();
  return Status::ok();
}

}  // namespace

Result<std::vector<GuestRegion>> parse_guest_regions(std::string_view json, uint64_t memfile_size) {
  const nlohmann::json doc = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) {
    return Status::invalid_argument("the guest memory mappings are not valid JSON");
  }
  if (!doc.is_array() || doc.empty()) {
    return Status::invalid_argument("the guest memory mappings are not a non-empty JSON array");
  }
  std::vector<GuestRegion> regions;
  for (size_t i = 0; i < doc.size(); ++i) {
    const nlohmann::json& item = doc[i];
    if (!item.is_object()) {
      return Status::invalid_argument(fmt::format("region {} is not a JSON object", i));
    }
    GuestRegion region;
    LB_RETURN_IF_ERROR(read_field(item, i, "base_host_virt_addr", &region.base));
    LB_RETURN_IF_ERROR(read_field(item, i, "size", &region.size));
    LB_RETURN_IF_ERROR(read_field(item, i, "offset", &region.offset));
    LB_RETURN_IF_ERROR(read_field(
        item, i, item.contains("page_size") ? "page_size" : "page_size_kib", &region.page_size));
    if (region.page_size != kSmallPage && region.page_size != kHugePage) {
      return Status::invalid_argument(
          fmt::format("region {}: page size {} is neither 4 KiB nor 2 MiB", i, region.page_size));
    }
    if (region.size == 0 || region.base % region.page_size != 0 ||
        region.size % region.page_size != 0 || region.offset % region.page_size != 0) {
      return Status::invalid_argument(fmt::format(
          "region {} (address {:#x}, {} bytes at memfile offset {}) is empty or not aligned to "
          "its {}-byte pages",
          i, region.base, region.size, region.offset, region.page_size));
    }
    if (region.base + region.size < region.base || region.offset > memfile_size ||
        region.size > memfile_size - region.offset) {
      return Status::invalid_argument(
          fmt::format("region {} ({} bytes at memfile offset {}) lies outside the {}-byte memfile",
                      i, region.size, region.offset, memfile_size));
    }
    regions.push_back(region);
  }
  std::sort(regions.begin(), regions.end(),
            [](const GuestRegion& a, const GuestRegion& b) { return a.base < b.base; });
  for (size_t i = 1; i < regions.size(); ++i) {
    if (regions[i].base < regions[i - 1].end()) {
      return Status::invalid_argument(
          fmt::format("regions at {:#x} and {:#x} overlap", regions[i - 1].base, regions[i].base));
    }
  }
  return regions;
}

const GuestRegion* region_at(const std::vector<GuestRegion>& regions, uint64_t address) {
  auto it = std::upper_bound(regions.begin(), regions.end(), address,
                             [](uint64_t a, const GuestRegion& r) { return a < r.base; });
  if (it == regions.begin()) return nullptr;
  --it;
  return address < it->end() ? &*it : nullptr;
}

const GuestRegion* region_of_offset(const std::vector<GuestRegion>& regions, uint64_t offset) {
  for (const GuestRegion& region : regions) {
    if (offset >= region.offset && offset - region.offset < region.size) return &region;
  }
  return nullptr;
}

}  // namespace lazyblock::uffd
