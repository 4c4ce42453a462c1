#include "daemon/device_specs.h"

#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

namespace lazyblock::daemon {
namespace {

using nlohmann::json;

// The body as a JSON object whose fields are all among `known`.
Result<json> parse_object(std::string_view body, const std::set<std::string>& known) {
  json doc = json::parse(body, nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return Status::invalid_argument("the body is not valid JSON");
  if (!doc.is_object()) return Status::invalid_argument("the body is not a JSON object");
  for (const auto& [field, value] : doc.items()) {
    if (!known.contains(field)) {
      return Status::invalid_argument(fmt::format("unknown field '{}'", field));
    }
  }
  return doc;
}

Result<std::string> string_field(const json& doc, const char* field, bool required) {
  if (!doc.contains(field)) {
    if (required) return Status::invalid_argument(fmt::format("field '{}' is missing", field));
    return std::string();
  }
  if (!doc[field].is_string()) {
    return Status::invalid_argument(fmt::format("field '{}' is not a string", field));
  }
  return doc[field].get<std::string>();
}

Result<bool> bool_field(const json& doc, const char* field, bool otherwise) {
  if (!doc.contains(field)) return otherwise;
  if (!doc[field].is_boolean()) {
    return Status::invalid_argument(fmt::format("field '{}' is not true or false", field));
  }
  return doc[field].get<bool>();
}

Result<image::Uuid> build_field(const json& doc) {
  Result<std::string> text = string_field(doc, "build", true);
  if (!text) return text.status();
  Result<image::Uuid> build = image::Uuid::parse(*text);
  if (!build) return Status::invalid_argument(fmt::format("build '{}' is not a UUID", *text));
  return build;
}

// One object name of a build ("rootfs.ext4"): its key is BUILD/NAME.
Result<std::string> name_field(const json& doc, const std::string& otherwise) {
  Result<std::string> name = string_field(doc, "name", otherwise.empty());
  if (!name) return name.status();
  if (!doc.contains("name")) return otherwise;
  if (name->empty() || name->find('/') != std::string::npos || *name == "." || *name == "..") {
    return Status::invalid_argument(fmt::format("name '{}' is not an object name", *name));
  }
  return name;
}

Result<std::optional<std::filesystem::path>> path_field(const json& doc, const char* field,
                                                        bool required) {
  Result<std::string> text = string_field(doc, field, required);
  if (!text) return text.status();
  if (!doc.contains(field)) return std::optional<std::filesystem::path>();
  const std::filesystem::path path(*text);
  if (!path.is_absolute()) {
    return Status::invalid_argument(fmt::format("{} '{}' is not an absolute path", field, *text));
  }
  return std::optional<std::filesystem::path>(path.lexically_normal());
}

}  // namespace

Result<DiskSpec> parse_disk_spec(std::string_view body) {
  Result<json> doc = parse_object(body, {"build", "name", "socket", "overlay", "read_only"});
  if (!doc) return doc.status();
  DiskSpec spec;
  Result<image::Uuid> build = build_field(*doc);
  if (!build) return build.status();
  spec.build = *build;
  Result<std::string> name = name_field(*doc, "");
  if (!name) return name.status();
  spec.name = *name;
  Result<std::optional<std::filesystem::path>> socket = path_field(*doc, "socket", true);
  if (!socket) return socket.status();
  spec.socket = **socket;
  Result<std::optional<std::filesystem::path>> overlay = path_field(*doc, "overlay", false);
  if (!overlay) return overlay.status();
  spec.overlay = *overlay;
  Result<bool> read_only = bool_field(*doc, "read_only", false);
  if (!read_only) return read_only.status();
  spec.read_only = *read_only;
  if (spec.read_only && spec.overlay) {
    return Status::invalid_argument("a read_only disk takes no overlay");
  }
  return spec;
}

Result<MemorySpec> parse_memory_spec(std::string_view body) {
  Result<json> doc = parse_object(body, {"build", "name", "socket", "prefetch", "record"});
  if (!doc) return doc.status();
  MemorySpec spec;
  Result<image::Uuid> build = build_field(*doc);
  if (!build) return build.status();
  spec.build = *build;
  Result<std::string> name = name_field(*doc, spec.name);
  if (!name) return name.status();
  spec.name = *name;
  Result<std::optional<std::filesystem::path>> socket = path_field(*doc, "socket", true);
  if (!socket) return socket.status();
  spec.socket = **socket;
  Result<bool> prefetch = bool_field(*doc, "prefetch", true);
  if (!prefetch) return prefetch.status();
  spec.prefetch = *prefetch;
  Result<std::optional<std::filesystem::path>> record = path_field(*doc, "record", false);
  if (!record) return record.status();
  spec.record = *record;
  return spec;
}

Status check_device_id(std::string_view id) {
  if (id.empty()) return Status::invalid_argument("the device id is empty");
  if (id.size() > kMaxIdBytes) {
    return Status::invalid_argument(fmt::format(
        "the device id is {} bytes long; at most {} are allowed", id.size(), kMaxIdBytes));
  }
  if (id.find('/') != std::string_view::npos) {
    return Status::invalid_argument(fmt::format("the device id '{}' has a '/'", id));
  }
  for (const char c : id) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) {
      return Status::invalid_argument("the device id has a control character");
    }
  }
  return Status::ok();
}

}  // namespace lazyblock::daemon
