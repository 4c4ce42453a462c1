// The bodies of the API's PUT requests, checked: what a disk or a memory
// device is to be. Anything malformed is refused with its reason, before
// anything is changed.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <string_view>

#include "common/status.h"
#include "image/header.h"

namespace lazyblock::daemon {

// PUT /disks/{id}: {"build", "name", "socket", "overlay"?, "read_only"?}
struct DiskSpec {
  image::Uuid build;
  std::string name;
  std::filesystem::path socket;
  std::optional<std::filesystem::path> overlay;  // kept there; none: a temporary overlay
  bool read_only = false;
};

// PUT /memory/{id}: {"build", "name"?, "socket", "prefetch"?, "record"?}
struct MemorySpec {
  image::Uuid build;
  std::string name = "memfile";
  std::filesystem::path socket;
  bool prefetch = true;  // the record kept beside the build (BUILD/NAME.prefetch), if any
  std::optional<std::filesystem::path> record;  // each VM's first-fault order, written at its end
};

// kInvalidArgument with the reason: not JSON, not an object, an unknown
// field, a field of the wrong type, a build that is not a UUID, a name that
// is not one object name, a path that is not absolute.
Result<DiskSpec> parse_disk_spec(std::string_view body);
Result<MemorySpec> parse_memory_spec(std::string_view body);

// A device id: 1 to 128 bytes, no '/', no control characters.
inline constexpr size_t kMaxIdBytes = 128;
Status check_device_id(std::string_view id);

}  // namespace lazyblock::daemon
