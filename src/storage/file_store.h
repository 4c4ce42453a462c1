// FileStore: objects as files under a root directory (file://DIR).
//
// Keys are relative paths ("BUILD/memfile"); a key that is absolute, holds a
// ".." or empty component, or resolves (through symlinks) outside the root is
// refused with kInvalidArgument. put() writes a temporary file beside the
// target and renames it into place, so readers never see a partial object.
// An object's version (ObjectInfo) is its file's inode and modification time
// in nanoseconds: a put (a new inode) or a rewrite in place (a new mtime)
// changes it. (A rewrite in place with the same size within one tick of the
// file system's clock goes unseen: objects are meant to be immutable.)
#pragma once

#include <filesystem>
#include <memory>
#include <string>

#include "common/unique_fd.h"
#include "storage/object_store.h"

namespace lazyblock {

class FileStore final : public ObjectStore {
 public:
  // Fails if `root` is not an existing directory.
  static Result<std::shared_ptr<FileStore>> open(const std::filesystem::path& root);
  ~FileStore() override;

  Result<uint64_t> stat(const std::string& key, const IoContext& io) override;
  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override;
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override;
  Status put(const std::string& key, std::span<const std::byte> data, const IoContext& io) override;
  Status remove(const std::string& key, const IoContext& io) override;
  std::string describe() const override;
  // "file://" and the root's canonical path, however it was spelled.
  std::string location() const override;

 private:
  // The calls above without the store's name, which they put in front of
  // every error ("file://DIR: object not found: KEY").
  Result<ObjectInfo> stat_info_here(const std::string& key);
  Result<std::unique_ptr<RangeReader>> open_range_here(const std::string& key, uint64_t offset,
                                                       uint64_t length);
  Status put_here(const std::string& key, std::span<const std::byte> data);
  Status remove_here(const std::string& key);

  FileStore(std::filesystem::path root, std::filesystem::path canonical_root, UniqueFd root_fd);

  const std::filesystem::path root_;
  const std::filesystem::path canonical_root_;
  const UniqueFd root_fd_;  // O_PATH descriptor of the root: keys resolve beneath it
};

}  // namespace lazyblock
