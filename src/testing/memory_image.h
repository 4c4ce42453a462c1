// A memory-like image for tests and benchmarks of compressed builds: what a
// guest's RAM holds, page by page, in proportions that compress about as a
// real memory snapshot does (2-4x with zstd): zero pages (never touched or
// freed), repeated pages (the same library or buffer in several places),
// text (source, logs, heaps of strings) and random pages (keys, compressed
// or encrypted data, which no codec shrinks).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace lazyblock::testing {

// `size` bytes (a whole number of 4 KiB pages, or a shorter last page) of
// such an image, the same for the same seed: about 35% zero pages, 20%
// copies of a few dozen distinct pages, 25% text, 20% random.
std::vector<std::byte> make_memory_image(uint64_t size, uint64_t seed);

}  // namespace lazyblock::testing
