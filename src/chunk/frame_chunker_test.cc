#include "chunk/frame_chunker.h"

#include <gtest/gtest.h>

#include <random>

#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"

namespace lazyblock {
namespace {

constexpr uint64_t kFrame = 256 * 1024;

// A sink that keeps what it is given.
class Collect final : public ByteSink {
 public:
  Status write(std::span<const std::byte> data) override {
    bytes.insert(bytes.end(), data.begin(), data.end());
    return Status::ok();
  }
  std::vector<std::byte> bytes;
};

class FrameChunkerTest : public ::testing::TestWithParam<FrameCodec> {
 protected:
  void SetUp() override {
    Result<testing::ScratchDir> scratch = testing::ScratchDir::create();
    ASSERT_TRUE(scratch);
    scratch_ = std::move(scratch).value();
    Result<std::shared_ptr<FileStore>> store = FileStore::open(scratch_->path());
    ASSERT_TRUE(store);
    store_ = *store;
    // Compressible data: pattern bytes in runs, zeros between.
    plain_ = testing::make_pattern(3, 0, 3 * kFrame + 12345);
    for (size_t i = 0; i < plain_.size(); ++i) {
      if ((i / 4096) % 3 == 0) plain_[i] = std::byte{0};
    }
    table_.codec = GetParam();
    for (uint64_t offset = 0; offset < plain_.size(); offset += kFrame) {
      const uint64_t size = std::min<uint64_t>(kFrame, plain_.size() - offset);
      Result<std::vector<std::byte>> frame =
          compress_frame(GetParam(), 1, std::span(plain_).subspan(offset, size));
      ASSERT_TRUE(frame) << frame.status().to_string();
      table_.frames.push_back({offset, size, stored_.size(), frame->size()});
      stored_.insert(stored_.end(), frame->begin(), frame->end());
    }
    ASSERT_TRUE(store_->put("obj", stored_, IoContext{}).is_ok());
  }

  std::unique_ptr<Chunker> chunker(FrameGeometry table) {
    ChunkerOptions options;
    options.cache_dir = scratch_->path();
    options.readahead_streams = 2;
    Result<std::unique_ptr<Chunker>> made = make_frame_chunker(store_, "obj", table, options);
    EXPECT_TRUE(made) << made.status().to_string();
    return made ? std::move(made).value() : nullptr;
  }

  std::optional<testing::ScratchDir> scratch_;
  std::shared_ptr<FileStore> store_;
  std::vector<std::byte> plain_;
  std::vector<std::byte> stored_;
  FrameGeometry table_;
};

TEST_P(FrameChunkerTest, AColdReadFetchesExactlyItsFrame) {
  std::unique_ptr<Chunker> frames = chunker(table_);
  ASSERT_TRUE(frames);
  EXPECT_EQ(*frames->size(), plain_.size());
  std::vector<std::byte> page(4096);
  Result<size_t> got = frames->read_at(page, kFrame + 8192);
  ASSERT_TRUE(got) << got.status().to_string();
  EXPECT_TRUE(std::equal(page.begin(), page.end(), plain_.begin() + kFrame + 8192));
  const ChunkerStats stats = frames->stats();
  EXPECT_EQ(stats.requests, 1u);
  EXPECT_EQ(stats.bytes, table_.frames[1].stored_size);
  // The whole frame is cached now, and only it.
  EXPECT_TRUE(frames->cached_slice(kFrame, kFrame));
  EXPECT_FALSE(frames->cached_slice(0, 4096));
}

TEST_P(FrameChunkerTest, EveryRangeReadsBackAndWriteToIsWhole) {
  std::unique_ptr<Chunker> frames = chunker(table_);
  ASSERT_TRUE(frames);
  std::mt19937_64 rng(5);
  for (int i = 0; i < 50; ++i) {
    const uint64_t offset = rng() % plain_.size();
    std::vector<std::byte> bytes(1 + rng() % (2 * kFrame));
    Result<size_t> got = frames->read_at(bytes, offset);
    ASSERT_TRUE(got) << got.status().to_string();
    ASSERT_EQ(*got, std::min<uint64_t>(bytes.size(), plain_.size() - offset));
    ASSERT_TRUE(std::equal(bytes.begin(), bytes.begin() + *got, plain_.begin() + offset));
  }
  std::unique_ptr<Chunker> fresh = chunker(table_);
  Collect sink;
  ASSERT_TRUE(fresh->write_to(sink).is_ok());
  EXPECT_TRUE(sink.bytes == plain_);
}

TEST_P(FrameChunkerTest, ADamagedFrameIsAnErrorNamingItAndCachesNothing) {
  std::vector<std::byte> damaged = stored_;
  damaged[table_.frames[2].stored_offset + table_.frames[2].stored_size / 2] ^= std::byte{0x5a};
  ASSERT_TRUE(store_->put("obj", damaged, IoContext{}).is_ok());
  std::unique_ptr<Chunker> frames = chunker(table_);
  std::vector<std::byte> page(4096);
  Result<size_t> got = frames->read_at(page, 2 * kFrame);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << got.status().to_string();
  EXPECT_NE(got.status().message().find("frame 2"), std::string::npos) << got.status().message();
  EXPECT_FALSE(frames->cached_slice(2 * kFrame, 4096));
  // The other frames are unharmed.
  EXPECT_TRUE(frames->read_at(page, 0));
}

TEST_P(FrameChunkerTest, AnObjectShorterThanItsTableIsAnError) {
  ASSERT_TRUE(store_->put("obj", std::span(stored_).first(stored_.size() - 10), IoContext{}).is_ok());
  std::unique_ptr<Chunker> frames = chunker(table_);
  std::vector<std::byte> page(4096);
  Result<size_t> got = frames->read_at(page, plain_.size() - 100);
  ASSERT_FALSE(got);
  EXPECT_NE(got.status().message().find("frame 3"), std::string::npos) << got.status().message();
}

TEST_P(FrameChunkerTest, OverlappingFramesAreRefusedAndGapsAreNotRead) {
  FrameGeometry broken = table_;
  broken.frames[1].offset -= 4096;
  ChunkerOptions options;
  options.cache_dir = scratch_->path();
  EXPECT_FALSE(make_frame_chunker(store_, "obj", broken, options));
  // A table without its second frame: the first and third serve, the gap is an error.
  FrameGeometry gap = table_;
  gap.frames.erase(gap.frames.begin() + 1);
  std::unique_ptr<Chunker> frames = chunker(gap);
  ASSERT_TRUE(frames);
  std::vector<std::byte> page(4096);
  EXPECT_TRUE(frames->read_at(page, 0));
  EXPECT_TRUE(frames->read_at(page, 2 * kFrame));
  Result<size_t> in_gap = frames->read_at(page, kFrame + 4096);
  ASSERT_FALSE(in_gap);
  EXPECT_NE(in_gap.status().message().find("no frame"), std::string::npos)
      << in_gap.status().message();
}

TEST_P(FrameChunkerTest, AFrameThatDecompressesToAnotherSizeIsAnError) {
  FrameGeometry wrong_size = table_;
  wrong_size.frames.back().size -= 1;  // it holds one byte more than the table says
  std::unique_ptr<Chunker> frames = chunker(wrong_size);
  std::vector<std::byte> page(10);
  Result<size_t> got = frames->read_at(page, wrong_size.frames.back().offset);
  ASSERT_FALSE(got);
  EXPECT_EQ(got.status().code(), StatusCode::kCorruption) << got.status().to_string();
  EXPECT_NE(got.status().message().find("frame 3"), std::string::npos) << got.status().message();
}

TEST_P(FrameChunkerTest, PrefetchedFramesAreCachedBeforeTheyAreRead) {
  std::unique_ptr<Chunker> frames = chunker(table_);
  frames->prefetch(0, plain_.size());
  // Reading the last byte waits for its frame; the prefetch brings them all.
  std::vector<std::byte> last(1);
  ASSERT_TRUE(frames->read_at(last, plain_.size() - 1));
  for (const CompressedFrame& frame : table_.frames) {
    std::vector<std::byte> bytes(frame.size);
    ASSERT_TRUE(frames->read_at(bytes, frame.offset));
  }
  EXPECT_EQ(frames->stats().requests, table_.frames.size()) << "a frame was fetched twice";
}

INSTANTIATE_TEST_SUITE_P(Codecs, FrameChunkerTest,
                         ::testing::Values(FrameCodec::kZstd, FrameCodec::kLz4),
                         [](const auto& info) { return std::string(frame_codec_name(info.param)); });

}  // namespace
}  // namespace lazyblock
