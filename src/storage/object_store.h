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
// - A RangeReader knows the object's total size once open_range returns
//   (as an HTTP range response carries it in Content-Range).
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

  // How many bytes the range holds: the requested length clipped to
  // object_size().
  virtual uint64_t range_length() const = 0;
};

class ObjectStore {
 public:
  virtual ~ObjectStore() = default;

  // The size of the object at `key`.
  virtual Result<uint64_t> stat(const std::string& key, const IoContext& io) = 0;

  // Opens a stream of [offset, offset + length) of the object at `key`,
  // clipped at its end.
  virtual Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                          uint64_t length,
                                                          const IoContext& io) = 0;

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
};

// Forwards every call to the store it wraps. Layers derive from it and
// override only what they change (as LevelDB's EnvWrapper).
class StoreLayer : public ObjectStore {
 public:
  explicit StoreLayer(std::shared_ptr<ObjectStore> inner) : inner_(std::move(inner)) {}

  Result<uint64_t> stat(const std::string& key, const IoContext& io) override {
    return inner_->stat(key, io);
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

 protected:
  ObjectStore& inner() { return *inner_; }
  const ObjectStore& inner() const { return *inner_; }

 private:
  const std::shared_ptr<ObjectStore> inner_;
};

}  // namespace lazyblock
