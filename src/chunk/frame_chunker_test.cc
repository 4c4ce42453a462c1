#include "chunk/frame_chunker.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "storage/file_store.h"
#include "testing/pattern.h"
#include "testing/scratch_dir.h"
#include "testing/vector_sink.h"

namespace lazyblock {
namespace {

constexpr uint64_t kFrame = 256 * 1024;

// A store whose reads of the range starting at `gated_offset` deliver the
// first half of it, then wait until open() is called: a fetch held in the
// middle of its frame, its decoder begun.
class GatedStore final : public StoreLayer {
 public:
  GatedStore(std::shared_ptr<ObjectStore> inner, uint64_t gated_offset)
      : StoreLayer(std::move(inner)), gated_offset_(gated_offset) {}

  Result<std::unique_ptr<RangeReader>> open_range(const std::string& key, uint64_t offset,
                                                  uint64_t length, const IoContext& io) override {
    Result<std::unique_ptr<RangeReader>> inner = StoreLayer::open_range(key, offset, length, io);
    if (!inner || offset != gated_offset_) return inner;
    return std::unique_ptr<RangeReader>(new Reader(std::move(inner).value(), *this));
  }

  // Waits until a fetch is held at the gate.
  void wait_until_held() {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [&] { return held_; });
  }
  void open() {
    std::lock_guard lock(mu_);
    opened_ = true;
    cv_.notify_all();
  }

 private:
  class Reader final : public RangeReader {
   public:
    Reader(std::unique_ptr<RangeReader> inner, GatedStore& gate)
        : inner_(std::move(inner)), gate_(gate) {}
    Result<size_t> read(std::span<std::byte> buffer) override {
      const uint64_t half = inner_->range_length() / 2;
      if (delivered_ < half) {
        Result<size_t> n =
            inner_->read(buffer.first(std::min<uint64_t>(buffer.size(), half - delivered_)));
        if (n) delivered_ += *n;
        return n;
      }
      std::unique_lock lock(gate_.mu_);
      gate_.held_ = true;
      gate_.cv_.notify_all();
      gate_.cv_.wait(lock, [&] { return gate_.opened_; });
      lock.unlock();
      return inner_->read(buffer);
    }
    uint64_t object_size() const override { return inner_->object_size(); }
    uint64_t range_length() const override { return inner_->range_length(); }

   private:
    const std::unique_ptr<RangeReader> inner_;
    GatedStore& gate_;
    uint64_t delivered_ = 0;
  };

  const uint64_t gated_offset_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool held_ = false;    // guarded by mu_
  bool opened_ = false;  // guarded by mu_
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
    options.parallel = 2;
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
  testing::VectorSink sink;
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
  ASSERT_TRUE(
      store_->put("obj", std::span(stored_).first(stored_.size() - 10), IoContext{}).is_ok());
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

// Cache hits take no lock a fetch holds while it receives and decodes a
// frame: with frame 1's fetch held in the middle of the frame (decoder begun,
// half its bytes decoded), reads of cached frame 0 still return.
TEST_P(FrameChunkerTest, CacheHitsProceedWhileAFrameIsHalfDecoded) {
  auto gated = std::make_shared<GatedStore>(store_, table_.frames[1].stored_offset);
  ChunkerOptions options;
  options.cache_dir = scratch_->path();
  options.readahead = false;
  Result<std::unique_ptr<Chunker>> made = make_frame_chunker(gated, "obj", table_, options);
  ASSERT_TRUE(made) << made.status().to_string();
  Chunker& frames = **made;
  std::vector<std::byte> page(4096);
  ASSERT_TRUE(frames.read_at(page, 0));  // frame 0, cached

  Result<size_t> second = size_t{0};
  std::vector<std::byte> second_page(4096);
  std::thread reader([&] { second = frames.read_at(second_page, kFrame); });
  gated->wait_until_held();
  // Frame 1's fetch is at the gate: hits on frame 0 must not wait for it.
  const std::optional<std::span<const std::byte>> hit = frames.cached_slice(4096, 4096);
  ASSERT_TRUE(hit);
  EXPECT_TRUE(std::equal(hit->begin(), hit->end(), plain_.begin() + 4096));
  Result<std::span<const std::byte>> sliced = frames.slice(8192, 4096);
  ASSERT_TRUE(sliced) << sliced.status().to_string();
  EXPECT_TRUE(std::equal(sliced->begin(), sliced->end(), plain_.begin() + 8192));
  Result<size_t> copied = frames.read_at(page, 12288);
  ASSERT_TRUE(copied) << copied.status().to_string();
  EXPECT_TRUE(std::equal(page.begin(), page.end(), plain_.begin() + 12288));
  EXPECT_FALSE(frames.cached_slice(kFrame, 4096)) << "frame 1 published before it verified";
  gated->open();
  reader.join();
  ASSERT_TRUE(second) << second.status().to_string();
  EXPECT_TRUE(std::equal(second_page.begin(), second_page.end(), plain_.begin() + kFrame));
}

// A frame decodes the same whatever pieces its stored bytes come in, and
// bytes missing at its end or following it are errors.
TEST_P(FrameChunkerTest, TheDecoderTakesAFrameInPiecesOfAnySize) {
  Result<std::unique_ptr<FrameDecoder>> decoder = FrameDecoder::create(GetParam());
  ASSERT_TRUE(decoder);
  const CompressedFrame& frame = table_.frames[1];
  const std::span<const std::byte> stored =
      std::span(stored_).subspan(frame.stored_offset, frame.stored_size);
  std::vector<std::byte> out(frame.size);
  for (const size_t piece : {size_t{1}, size_t{7}, size_t{4096}, stored.size()}) {
    std::fill(out.begin(), out.end(), std::byte{0});
    ASSERT_TRUE((*decoder)->begin(out).is_ok());
    for (size_t at = 0; at < stored.size(); at += piece) {
      ASSERT_TRUE((*decoder)->feed(stored.subspan(at, std::min(piece, stored.size() - at))).is_ok())
          << "piece " << piece << " at " << at;
    }
    ASSERT_TRUE((*decoder)->finish().is_ok()) << "pieces of " << piece;
    EXPECT_EQ((*decoder)->decoded(), frame.size);
    EXPECT_TRUE(std::equal(out.begin(), out.end(), plain_.begin() + frame.offset));
  }
  // Short by a byte: not finished.
  ASSERT_TRUE((*decoder)->begin(out).is_ok());
  ASSERT_TRUE((*decoder)->feed(stored.first(stored.size() - 1)).is_ok());
  const Status short_by_one = (*decoder)->finish();
  EXPECT_EQ(short_by_one.code(), StatusCode::kCorruption) << short_by_one.to_string();
  // A byte after the frame's end.
  std::vector<std::byte> longer(stored.begin(), stored.end());
  longer.push_back(std::byte{0});
  ASSERT_TRUE((*decoder)->begin(out).is_ok());
  const Status trailing = (*decoder)->feed(longer);
  EXPECT_EQ(trailing.code(), StatusCode::kCorruption) << trailing.to_string();
}

INSTANTIATE_TEST_SUITE_P(Codecs, FrameChunkerTest,
                         ::testing::Values(FrameCodec::kZstd, FrameCodec::kLz4),
                         [](const auto& info) {
                           return std::string(frame_codec_name(info.param));
                         });

}  // namespace
}  // namespace lazyblock
