// ObjectStore and RangeReader: the seam between lazyblock and the places its
// immutable objects live.
//
// Data flow: a chunker fetch calls open_range(key, offset, length, io) and
// then read() repeatedly, writing each batch straight into its cache, until
// read() reports the end of the range. Store *layers* (simulated latency,
// fault injection, later retry and a persistent cache) wrap another store and
// are stores themselves, so they stack: StoreLayer forwards every call.
//
// Contracts every implementation keeps:
// - Objects are immutable: the same key and range always yield the same bytes.
// - open_range clips the range at the object's end (a range that reaches past
//   it yields the bytes that exist); a range starting past the end fails with
//   kOutOfRange; a missing key fails with kNotFound, "object not found: KEY".
// - Errors name the store and the key once: the innermost store starts its
//   messages with its describe() ("STORE: read KEY [OFFSET, +LENGTH): cause",
//   "STORE: object not found: KEY"); layers over it add only what they know
//   and it does not (a retry layer how long it tried).
// - A RangeReader knows the object's total size once open_range returns
//   (as an HTTP range response carries it in Content-Range), and its version
//   where the store has one (see ObjectInfo).
// - stat() and stat_info() agree with what open_range reports: the same size,
//   and stat_info() the same version as a RangeReader's object_version().
// - Every wait honours the IoContext given to open_range: kTimeout once its
//   deadline passes, kCancelled once its stop is requested.
// - Stores are safe to call from many threads at once; one RangeReader is used
//   by one thread at a time.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "common/io_context.h"
#include "common/status.h"

namespace lazyblock {

// What a store says about an object: its size and its version.
//
// The version is an opaque token that changes whenever the object's bytes may
// have changed, so that anything kept from an earlier read (a persistent
// cache) can tell whether it still holds the object's bytes: an HTTP ETag
// (else its Last-Modified), a GCS generation, for a local file its inode and
// modification time. Empty when the store gives none (a layer or store that
// cannot know): then only the size tells two versions apart.
struct ObjectInfo {
  uint64_t size = 0;
  std::string version;

  bool operator==(const ObjectInfo&) const = default;
};

// A stream of the bytes of one range of one object.
class RangeReader {
 public:
  virtual ~RangeReader() = default;

  // Reads the next bytes of the range into `buffer` (non-empty). Blocks until
  // at least one byte is available; returns how many were read, 0 once the
  // range has been read to its end, or an error. A stream that ends before the
  // length the range promised is the caller's to detect (see
  // range_length()): a reader reports what arrived, never invents bytes.
  virtual Result<size_t> read(std::span<std::byte> buffer) = 0;

  // The total size of the object, as the store reported it when the range was
  // opened. (A misbehaving store may report a wrong one: callers check.)
  virtual uint64_t object_size() const = 0;

  // The object's version (see ObjectInfo), from the same answer as
  // object_size(); empty if the store gives none. Layers that wrap a reader
  // pass the inner one's on.
  virtual std::string object_version() const { return {}; }

  // How many bytes the range holds: the requested length clipped to
  // object_size().
  virtual uint64_t range_length() const = 0;
};

class ObjectStore {
 public:
  virtual ~ObjectStore() = default;

  // The size of the object at `key`.
  virtual Result<uint64_t> stat(const std::string& key, const IoContext& io) = 0;

  // The size and version of the object at `key`, from one request. Stores
  // that have versions override it; the default is stat() with no version.
  virtual Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) {
    Result<uint64_t> size = stat(key, io);
    if (!size) return size.status();
    return ObjectInfo{*size, {}};
  }

  // Opens a stream of [offset, offset + length) of the object at `key`,
  // clipped at its end.
  virtual Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                          uint64_t length, const IoContext& io) = 0;

  // Stores `data` as the object at `key`, replacing any object there.
  // Readers never see a partial object.
  virtual Status put(const std::string& key, std::span<const std::byte> data,
                     const IoContext& io) = 0;

  // Removes the object at `key`; kNotFound if there is none.
  virtual Status remove(const std::string& key, const IoContext& io) = 0;

  // What this store is, for messages: "file:///data", "simulate(ttfb=20ms,...)
  // over file:///data".
  virtual std::string describe() const = 0;

  // Whether put() and remove() are refused whatever the key (an http://
  // store): writers check it before they start their work.
  virtual bool read_only() const { return false; }

  // Where the objects live, for state kept across processes (a persistent
  // cache says whose objects it holds): the innermost store's URL, the same
  // whatever layers are stacked over it. Default: describe().
  virtual std::string location() const { return describe(); }
};

// Forwards every call to the store it wraps. Layers derive from it and
// override only what they change (as LevelDB's EnvWrapper). A layer sees a
// stat as stat_info(): stat() is its size, so the two cannot disagree.
class StoreLayer : public ObjectStore {
 public:
  explicit StoreLayer(std::shared_ptr<ObjectStore> inner) : inner_(std::move(inner)) {}

  Result<uint64_t> stat(const std::string& key, const IoContext& io) final {
    Result<ObjectInfo> info = stat_info(key, io);
    if (!info) return info.status();
    return info->size;
  }
  Result<ObjectInfo> stat_info(const std::string& key, const IoContext& io) override {
    return inner_->stat_info(key, io);
  }
  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override {
    return inner_->open_range(key, offset, length, io);
  }
  Status put(const std::string& key, std::span<const std::byte> data,
             const IoContext& io) override {
    return inner_->put(key, data, io);
  }
  Status remove(const std::string& key, const IoContext& io) override {
    return inner_->remove(key, io);
  }
  std::string describe() const override { return inner_->describe(); }
  bool read_only() const override { return inner_->read_only(); }
  std::string location() const override { return inner_->location(); }

 protected:
  ObjectStore& inner() { return *inner_; }
  const ObjectStore& inner() const { return *inner_; }

 private:
  const std::shared_ptr<ObjectStore> inner_;
};

}  // namespace lazyblock
