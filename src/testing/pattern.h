// Self-checking test data: the byte at offset `o` of a pattern object is a
// function of (seed, o), so any read of any range can be verified on its own,
// by tests and benchmarks alike, without keeping a copy of the object.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace lazyblock::testing {

// The byte at `offset` of the pattern with `seed`: each aligned 8-byte word
// is a hash of its index, so a shifted, repeated or zeroed range is caught.
std::byte pattern_byte(uint64_t seed, uint64_t offset);

// Fills `out` with the pattern bytes [offset, offset + out.size()).
void fill_pattern(uint64_t seed, uint64_t offset, std::span<std::byte> out);

// The pattern bytes [offset, offset + length).
std::vector<std::byte> make_pattern(uint64_t seed, uint64_t offset, uint64_t length);

// The index of the first byte of `data` that differs from the pattern at
// `offset`, or data.size() if all match.
size_t first_pattern_mismatch(uint64_t seed, uint64_t offset, std::span<const std::byte> data);

}  // namespace lazyblock::testing
