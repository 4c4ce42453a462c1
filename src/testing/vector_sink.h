// VectorSink: a ByteSink that keeps in memory what it is given, for tests
// of the write paths (write_to, write_range_to). It has ByteSink's own
// write_from_mapping: a guarded copy out of the map, then write().
#pragma once

#include <cstddef>
#include <span>
#include <vector>

#include "common/byte_sink.h"
#include "common/status.h"

namespace lazyblock::testing {

class VectorSink final : public ByteSink {
 public:
  Status write(std::span<const std::byte> data) override {
    bytes.insert(bytes.end(), data.begin(), data.end());
    return Status::ok();
  }
  std::vector<std::byte> bytes;
};

}  // namespace lazyblock::testing
