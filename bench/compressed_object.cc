#include "bench/compressed_object.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "chunk/frame_codec.h"
#include "common/file_io.h"
#include "common/unique_fd.h"
#include "common/units.h"
#include "image/data_file_writer.h"
#include "testing/memory_image.h"

namespace lazyblock {
namespace {

constexpr uint64_t kPiece = 16 * kMiB;
constexpr uint64_t kFrameSize = 2 * kMiB;  // E2B's, and pack's default
// Frames decompressed to measure a core's speed: enough to smooth the mix
// of page kinds, few enough to take well under a second.
constexpr size_t kSampledFrames = 32;
constexpr size_t kMinPasses = 5;
constexpr uint64_t kMinDecompressed = 64 * kMiB;

std::vector<std::byte> piece(uint64_t size, uint64_t seed, uint64_t index) {
  return testing::make_memory_image(std::min(kPiece, size - index * kPiece), seed + index);
}

}  // namespace

void fill_memory_image(uint64_t size, uint64_t seed, uint64_t offset, std::span<std::byte> out) {
  while (!out.empty()) {
    const uint64_t index = offset / kPiece;
    const std::vector<std::byte> bytes = piece(size, seed, index);
    const uint64_t within = offset - index * kPiece;
    const size_t take = std::min<uint64_t>(out.size(), bytes.size() - within);
    std::memcpy(out.data(), bytes.data() + within, take);
    out = out.subspan(take);
    offset += take;
  }
}

Status MemoryImageChecker::write(std::span<const std::byte> data) {
  while (!data.empty()) {
    const uint64_t index = offset_ / kPiece;
    if (index != piece_index_) {
      if (offset_ >= size_) return Status::corruption("bench: more bytes than the image holds");
      piece_ = piece(size_, seed_, index);
      piece_index_ = index;
    }
    const uint64_t within = offset_ - index * kPiece;
    const size_t take = std::min<uint64_t>(data.size(), piece_.size() - within);
    if (std::memcmp(data.data(), piece_.data() + within, take) != 0) {
      return Status::corruption(
          fmt::format("bench: wrong bytes in [{}, {})", offset_, offset_ + take));
    }
    data = data.subspan(take);
    offset_ += take;
  }
  return Status::ok();
}

Result<CompressedObject> write_compressed_object(const std::filesystem::path& path, uint64_t size,
                                                 FrameCodec codec, uint64_t seed) {
  std::filesystem::create_directories(path.parent_path());
  const UniqueFd fd(::open(path.c_str(), O_CREAT | O_TRUNC | O_RDWR | O_CLOEXEC, 0644));
  if (fd.get() < 0) return posix_error("bench: create " + path.string(), errno);
  image::DataFileFormat format;
  format.codec = codec == FrameCodec::kLz4 ? image::Codec::kLz4 : image::Codec::kZstd;
  format.level = default_level(codec);
  format.frame_size = kFrameSize;
  Result<std::unique_ptr<image::DataFileWriter>> writer =
      image::DataFileWriter::create(fd.get(), format);
  if (!writer) return writer.status();
  for (uint64_t index = 0; index * kPiece < size; ++index) {
    LB_RETURN_IF_ERROR((*writer)->append(piece(size, seed, index)));
  }
  Result<image::WrittenDataFile> written = (*writer)->finish();
  if (!written) return written.status();

  CompressedObject object;
  object.size = written->size;
  object.stored_bytes = written->stored_bytes;
  object.geometry.codec = codec;
  for (const image::Frame& f : written->frame_table.frames) {
    object.geometry.frames.push_back({f.start_u, f.size_u, f.start_c, f.size_c});
  }
  // One core's decompression speed, over frames spread through the object:
  // the median of several passes, as a pass may lose the core to others.
  const std::vector<CompressedFrame>& frames = object.geometry.frames;
  const size_t step = std::max<size_t>(1, frames.size() / kSampledFrames);
  std::vector<std::pair<std::vector<std::byte>, uint64_t>> sample;  // stored bytes, size
  for (size_t i = 0; i < frames.size(); i += step) {
    std::vector<std::byte> stored(frames[i].stored_size);
    Result<size_t> got = pread_up_to(fd.get(), stored, frames[i].stored_offset, path.string());
    if (!got) return got.status();
    sample.emplace_back(std::move(stored), frames[i].size);
  }
  std::vector<std::byte> plain;
  std::vector<double> speeds;
  uint64_t decompressed = 0;
  while (speeds.size() < kMinPasses || decompressed < kMinDecompressed) {
    uint64_t bytes = 0;
    const auto begin = std::chrono::steady_clock::now();
    for (const auto& [stored, size] : sample) {
      plain.resize(size);
      LB_RETURN_IF_ERROR(decompress_frame(codec, stored, plain));
      bytes += size;
    }
    const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - begin;
    speeds.push_back(static_cast<double>(bytes) / std::max(1e-9, spent.count()));
    decompressed += bytes;
  }
  std::sort(speeds.begin(), speeds.end());
  object.decompress_bytes_per_second = speeds[speeds.size() / 2];
  return object;
}

Result<double> measure_decode_and_cache(const std::filesystem::path& path,
                                        const CompressedObject& object,
                                        const std::filesystem::path& dir, int threads,
                                        uint64_t bytes) {
  const UniqueFd in(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (in.get() < 0) return posix_error("bench: open " + path.string(), errno);
  Result<UniqueFd> out = open_unnamed_file(dir, "bench: the decoded bytes' file");
  if (!out) return out.status();
  const std::vector<CompressedFrame>& frames = object.geometry.frames;
  size_t count = 0;
  for (uint64_t sum = 0; count < frames.size() && sum < bytes; ++count) sum += frames[count].size;
  std::vector<Status> statuses(static_cast<size_t>(threads));
  std::atomic<uint64_t> delivered{0};
  const auto begin = std::chrono::steady_clock::now();
  std::vector<std::thread> workers;
  for (int t = 0; t < threads; ++t) {
    workers.emplace_back([&, t] {
      Status& status = statuses[static_cast<size_t>(t)];
      Result<std::unique_ptr<FrameDecoder>> decoder = FrameDecoder::create(object.geometry.codec);
      if (!decoder) {
        status = decoder.status();
        return;
      }
      std::vector<std::byte> stored;
      std::vector<std::byte> plain;
      for (size_t i = static_cast<size_t>(t); i < count; i += static_cast<size_t>(threads)) {
        const CompressedFrame& frame = frames[i];
        stored.resize(frame.stored_size);
        plain.resize(frame.size);
        Result<size_t> got = pread_up_to(in.get(), stored, frame.stored_offset, path.string());
        if (!got) {
          status = got.status();
          return;
        }
        status = (*decoder)->begin(plain);
        if (status.is_ok()) status = (*decoder)->feed(stored);
        if (status.is_ok()) status = (*decoder)->finish();
        if (status.is_ok()) status = pwrite_all(out->get(), plain, frame.offset, "bench: scratch");
        if (!status.is_ok()) return;
        delivered.fetch_add(frame.size, std::memory_order_relaxed);
      }
    });
  }
  for (std::thread& worker : workers) worker.join();
  const std::chrono::duration<double> spent = std::chrono::steady_clock::now() - begin;
  for (const Status& status : statuses) LB_RETURN_IF_ERROR(status);
  return static_cast<double>(delivered.load()) / std::max(1e-9, spent.count());
}

}  // namespace lazyblock
