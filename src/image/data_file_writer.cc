#include "image/data_file_writer.h"

#include <openssl/evp.h>

#include <algorithm>
#include <cstring>
#include <future>
#include <thread>

#include <fmt/format.h>

#include "chunk/frame_codec.h"
#include "common/file_io.h"
#include "common/units.h"

namespace lazyblock::image {
namespace {

// Frames larger than this would make the bounded queue hold too much (two
// frames per core, twice over with their compressed copies).
constexpr uint64_t kMaxFrameSize = 64 * kMiB;

FrameCodec frame_codec(Codec codec) {
  return codec == Codec::kLz4 ? FrameCodec::kLz4 : FrameCodec::kZstd;
}

}  // namespace

class DataFileWriter::Sha256 {
 public:
  Sha256() : context_(EVP_MD_CTX_new()) { EVP_DigestInit_ex(context_, EVP_sha256(), nullptr); }
  ~Sha256() { EVP_MD_CTX_free(context_); }
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;

  void update(std::span<const std::byte> bytes) {
    EVP_DigestUpdate(context_, bytes.data(), bytes.size());
  }
  std::array<uint8_t, 32> digest() {
    std::array<uint8_t, 32> out{};
    unsigned int length = 0;
    EVP_DigestFinal_ex(context_, out.data(), &length);
    return out;
  }

 private:
  EVP_MD_CTX* const context_;
};

// One frame on its way through an encoder.
struct DataFileWriter::Job {
  std::vector<std::byte> input;  // the frame's uncompressed bytes
  uint64_t start_u = 0;
  std::promise<Result<std::vector<std::byte>>> encoded;
  std::future<Result<std::vector<std::byte>>> done = encoded.get_future();
};

Result<std::unique_ptr<DataFileWriter>> DataFileWriter::create(int fd,
                                                               const DataFileFormat& format) {
  if (!codec_from_id(static_cast<uint32_t>(format.codec))) {
    return Status::invalid_argument(
        fmt::format("unknown codec {}", static_cast<uint32_t>(format.codec)));
  }
  int threads = 0;
  if (format.codec != Codec::kNone) {
    LB_RETURN_IF_ERROR(check_level(frame_codec(format.codec), format.level));
    if (format.frame_size == 0 || format.frame_size % 4096 != 0 ||
        format.frame_size > kMaxFrameSize) {
      return Status::invalid_argument(
          fmt::format("frame size {} must be a multiple of 4 KiB of at most {}", format.frame_size,
                      format_size(kMaxFrameSize)));
    }
    threads = format.threads > 0
                  ? format.threads
                  : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }
  return std::unique_ptr<DataFileWriter>(new DataFileWriter(fd, format, threads));
}

DataFileWriter::DataFileWriter(int fd, const DataFileFormat& format, int threads)
    : fd_(fd),
      format_(format),
      in_flight_limit_(2 * static_cast<size_t>(threads)),
      sha_(format.digest || format.codec != Codec::kNone ? std::make_unique<Sha256>() : nullptr) {
  table_.codec = format.codec;
  if (threads > 0) encoders_ = std::make_unique<WorkerPool>(threads);
}

DataFileWriter::~DataFileWriter() = default;

Status DataFileWriter::append(std::span<const std::byte> bytes) {
  if (sha_) sha_->update(bytes);
  if (format_.codec == Codec::kNone) {
    LB_RETURN_IF_ERROR(pwrite_all(fd_, bytes, size_, "the new data file"));
    size_ += bytes.size();
    stored_ = size_;
    return Status::ok();
  }
  while (!bytes.empty()) {
    if (current_.capacity() < format_.frame_size) {
      if (!spare_.empty()) {
        current_ = std::move(spare_.back());
        spare_.pop_back();
      }
      current_.reserve(format_.frame_size);
    }
    const size_t take = std::min<size_t>(bytes.size(), format_.frame_size - current_.size());
    current_.insert(current_.end(), bytes.begin(), bytes.begin() + take);
    bytes = bytes.subspan(take);
    size_ += take;
    if (current_.size() == format_.frame_size) LB_RETURN_IF_ERROR(submit_frame());
  }
  return Status::ok();
}

Status DataFileWriter::submit_frame() {
  if (table_.frames.size() + in_flight_.size() >= kMaxFramesPerBuild) {
    return Status::invalid_argument(
        fmt::format("the data file needs more than {} frames of {}: give a larger --frame-size",
                    kMaxFramesPerBuild, format_size(format_.frame_size)));
  }
  while (in_flight_.size() >= in_flight_limit_) LB_RETURN_IF_ERROR(write_oldest());
  auto job = std::make_shared<Job>();
  job->start_u = size_ - current_.size();
  job->input = std::move(current_);
  current_ = {};
  const FrameCodec codec = frame_codec(format_.codec);
  const int level = format_.level;
  encoders_->submit(
      [job, codec, level] { job->encoded.set_value(compress_frame(codec, level, job->input)); });
  in_flight_.push_back(std::move(job));
  return Status::ok();
}

Status DataFileWriter::write_oldest() {
  const std::shared_ptr<Job> job = std::move(in_flight_.front());
  in_flight_.pop_front();
  Result<std::vector<std::byte>> encoded = job->done.get();
  if (!encoded) {
    return encoded.status().with_context(fmt::format("compress the frame at {}", job->start_u));
  }
  LB_RETURN_IF_ERROR(pwrite_all(fd_, *encoded, stored_, "the new data file"));
  table_.frames.push_back({job->start_u, stored_, static_cast<uint32_t>(job->input.size()),
                           static_cast<uint32_t>(encoded->size())});
  stored_ += encoded->size();
  job->input.clear();
  spare_.push_back(std::move(job->input));
  return Status::ok();
}

Result<WrittenDataFile> DataFileWriter::finish() {
  if (format_.codec != Codec::kNone) {
    if (!current_.empty()) LB_RETURN_IF_ERROR(submit_frame());
    while (!in_flight_.empty()) LB_RETURN_IF_ERROR(write_oldest());
  }
  WrittenDataFile written;
  written.size = size_;
  written.stored_bytes = stored_;
  if (sha_) written.sha256 = sha_->digest();
  written.frame_table = table_;
  // A codec without frames reads as "uncompressed" (E2B's rule): a build
  // that stores no bytes has an empty plain data file, whatever the codec.
  if (table_.frames.empty()) written.frame_table.codec = Codec::kNone;
  return written;
}

}  // namespace lazyblock::image
