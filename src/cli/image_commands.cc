// lazyblock pack / export / inspect: builds made of a header and data files
// (DESIGN.md, "image").
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stop_token>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/output.h"
#include "cli/stop_signals.h"
#include "cli/stream_copy.h"
#include "common/output_file.h"
#include "common/unique_fd.h"
#include "common/units.h"
#include "image/device.h"
#include "image/pack.h"
#include "image/verify.h"

namespace lazyblock::cli {
namespace {

using image::Uuid;

// The flags of every command that names a build's device.
struct DeviceFlags {
  StoreFlags store;
  std::string build;
  std::string name;
  std::string log_level = "warn";
};

void add_device_flags(CLI::App& command, DeviceFlags& flags, StoreUse use = StoreUse::kRead) {
  add_store_flags(command, flags.store, use);
  command.add_option("--build", flags.build, "The build's id (a UUID)")->required();
  command.add_option("--name", flags.name, "The device: memfile, rootfs.ext4, ...")->required();
  add_log_flag(command, flags.log_level);
}

// The data files of the store the flags name, and the build's id.
struct Opened {
  std::shared_ptr<image::DataFiles> files;
  Uuid build;
};

// `streaming`: the device is read once, in order (stream_in_order).
Result<Opened> open_flags(const DeviceFlags& flags, bool for_writing = false,
                          bool streaming = false) {
  LB_RETURN_IF_ERROR(apply_log_level(flags.log_level));
  Result<Uuid> build = Uuid::parse(flags.build);
  if (!build) return build.status().with_context("--build");
  if (flags.name.empty() || flags.name.find('/') != std::string::npos) {
    return Status::invalid_argument(fmt::format("--name '{}' must be a file name", flags.name));
  }
  Result<ChunkerOptions> options = chunker_options(flags.store);
  if (!options) return options.status();
  if (streaming) prepare_for_streaming(*options);
  Result<StoreStackOptions> stack = store_stack_options(flags.store);
  if (!stack) return stack.status();
  stack->create_directory = for_writing;
  Result<std::shared_ptr<ObjectStore>> store = open_store(flags.store.store, *stack);
  if (!store) return store.status();
  return Opened{std::make_shared<image::DataFiles>(*store, *options), *build};
}

struct PackFlags {
  DeviceFlags device;
  std::string parent;
  std::string block_size;
  std::string input;
  std::string overlay;
  std::string compress;
  std::string frame_size;
  std::optional<int> level;
  std::optional<uint64_t> header_version;
  bool force = false;
  bool json = false;
};

// The codec and frames of `pack --compress`.
Status apply_compression_flags(const PackFlags& flags, image::PackOptions& options) {
  if (flags.compress.empty()) {
    if (flags.level || !flags.frame_size.empty()) {
      return Status::invalid_argument("--level and --frame-size need --compress zstd|lz4");
    }
  } else if (flags.compress == "zstd") {
    options.codec = image::Codec::kZstd;
  } else if (flags.compress == "lz4") {
    options.codec = image::Codec::kLz4;
  } else {
    return Status::invalid_argument(
        fmt::format("--compress {}: the codecs are zstd and lz4", flags.compress));
  }
  options.level = flags.level;
  if (!flags.frame_size.empty()) {
    Result<uint64_t> frame_size = parse_size(flags.frame_size);
    if (!frame_size) return frame_size.status().with_context("--frame-size");
    options.frame_size = *frame_size;
  }
  options.header_version = flags.header_version;
  return Status::ok();
}

int run_pack(const PackFlags& flags) {
  // Before any thread starts: a signal mid-upload stops the upload (and
  // aborts a multipart one) instead of leaving parts behind.
  StopSignals signals;
  std::stop_source stop;
  Result<Opened> opened = open_flags(flags.device, /*for_writing=*/true);
  if (!opened) return report_failure(opened.status());
  image::PackOptions options;
  options.build = opened->build;
  options.name = flags.device.name;
  options.force = flags.force;
  options.stop = stop.get_token();
  if (!flags.block_size.empty()) {
    Result<uint64_t> block_size = parse_size(flags.block_size);
    if (!block_size) return report_failure(block_size.status().with_context("--block-size"));
    options.block_size = *block_size;
  }
  if (!flags.parent.empty()) {
    Result<Uuid> parent = Uuid::parse(flags.parent);
    if (!parent) return report_failure(parent.status().with_context("--parent"));
    options.parent = *parent;
  }
  if (flags.input.empty() == flags.overlay.empty()) {
    return report_failure(Status::invalid_argument(
        "pack takes a raw image FILE (- for stdin), or --overlay PATH with --parent"));
  }
  if (!flags.overlay.empty()) options.overlay = flags.overlay;
  if (Status s = apply_compression_flags(flags, options); !s.is_ok()) return report_failure(s);
  UniqueFd input;  // none: stdin
  if (!flags.input.empty() && flags.input != "-") {
    input.reset(::open(flags.input.c_str(), O_RDONLY | O_CLOEXEC));
    if (!input) return report_failure(posix_error("open " + flags.input, errno));
  }
  const int fd = input ? input.get() : STDIN_FILENO;
  struct stat st {};
  const uint64_t total = ::fstat(fd, &st) == 0 && S_ISREG(st.st_mode) ? st.st_size : 0;
  signals.on_signal([&] { stop.request_stop(); });
  const auto started = std::chrono::steady_clock::now();
  Result<image::PackSummary> summary = [&] {
    Progress progress("pack " + flags.device.name, total);
    return image::pack(opened->files, fd, options, [&](uint64_t done) { progress.update(done); });
  }();
  signals.stop_waiting();
  input.reset();
  if (!summary) {
    if (signals.received() != 0) {
      return report_failure(
          Status::cancelled(fmt::format("pack {}: interrupted by signal {}: nothing was stored",
                                        flags.device.name, signals.received())));
    }
    return report_failure(summary.status().with_context("pack " + flags.device.name));
  }
  const image::Header& header = summary->header;
  if (summary->parent_size && *summary->parent_size != header.size) {
    std::fprintf(stderr,
                 "lazyblock: note: the image is %llu bytes, its parent's device %llu: the new "
                 "build's device has the image's size\n",
                 static_cast<unsigned long long>(header.size),
                 static_cast<unsigned long long>(*summary->parent_size));
  }
  if (flags.json) {
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    nlohmann::json doc = {
        {"name", flags.device.name},
        {"build", header.build_id.to_string()},
        {"parent", flags.parent.empty() ? nlohmann::json() : nlohmann::json(flags.parent)},
        {"generation", header.generation},
        {"size", header.size},
        {"block_size", header.block_size},
        {"blocks", summary->blocks},
        {"changed", summary->changed},
        {"zero", summary->zero},
        {"unchanged", summary->unchanged},
        {"data_bytes", summary->data_bytes},
        {"header_version", header.version},
        {"data_key", summary->data_key},
        {"codec", image::codec_name(summary->frame_table.codec)},
        {"frames", summary->frame_table.frames.size()},
        {"stored_bytes", summary->stored_bytes},
        {"header_bytes", summary->header_bytes},
        {"seconds", seconds}};
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }
  std::printf(
      "packed %s of build %s (generation %llu): %s in %llu blocks of %llu bytes: %llu changed, "
      "%llu zero, %llu unchanged; stored %s of data%s and a version %llu header of %s\n",
      flags.device.name.c_str(), header.build_id.to_string().c_str(),
      static_cast<unsigned long long>(header.generation), format_size(header.size).c_str(),
      static_cast<unsigned long long>(summary->blocks),
      static_cast<unsigned long long>(header.block_size),
      static_cast<unsigned long long>(summary->changed),
      static_cast<unsigned long long>(summary->zero),
      static_cast<unsigned long long>(summary->unchanged), format_size(summary->data_bytes).c_str(),
      summary->frame_table.compressed()
          ? fmt::format(" as {} in {} {} frames ({:.2f}x)", format_size(summary->stored_bytes),
                        summary->frame_table.frames.size(),
                        image::codec_name(summary->frame_table.codec),
                        static_cast<double>(summary->data_bytes) /
                            static_cast<double>(summary->stored_bytes))
                .c_str()
          : "",
      static_cast<unsigned long long>(header.version), format_size(summary->header_bytes).c_str());
  return 0;
}

struct ExportFlags {
  DeviceFlags device;
  std::string output;
};

int run_export(const ExportFlags& flags) {
  // The output first: a path that cannot be written is refused before any work.
  Result<std::unique_ptr<OutputFile>> output = OutputFile::open(flags.output);
  if (!output) return report_failure(output.status().with_context("export"));
  Result<Opened> opened = open_flags(flags.device, /*for_writing=*/false, /*streaming=*/true);
  if (!opened) return report_failure(opened.status());
  Result<std::unique_ptr<image::Device>> device =
      image::Device::open(opened->files, opened->build, flags.device.name);
  if (!device) return report_failure(device.status().with_context("export"));
  Status status = (*output)->expect_size((*device)->size());
  if (status.is_ok()) {
    Progress progress("export " + flags.device.name, (*device)->size());
    ProgressSink counted((*output)->sink(), progress);
    status = stream_in_order(source_of(**device), counted, opened->files->options());
  }
  if (status.is_ok()) status = (*output)->commit();
  if (!status.is_ok()) return report_failure(status.with_context("export " + flags.device.name));
  return 0;
}

struct InspectFlags {
  DeviceFlags device;
  bool json = false;
  bool no_mappings = false;
  bool verify = false;
};

// A build whose data file the device reads, with its generation (from its
// own header; unknown if that header cannot be read) and how its data file
// is stored.
struct ChainLink {
  image::Uuid build;
  std::optional<uint64_t> generation;
  std::string problem;  // why the generation is unknown
  // The build's own header's entry for itself (its whole frame table), else
  // the device's header's (only the frames its mappings reach), else an
  // empty one: stored plain, size unknown.
  image::BuildInfo info;
  uint64_t mapped_end = 0;  // the end of the furthest range mappings take from it
};

// What a link's frame table says of its stored bytes.
struct StoredSizes {
  uint64_t uncompressed = 0;  // of the frames listed
  uint64_t compressed = 0;
};

StoredSizes stored_sizes(const image::BuildInfo& info) {
  StoredSizes sizes;
  for (const image::Frame& f : info.frame_table.frames) {
    sizes.uncompressed += f.size_u;
    sizes.compressed += f.size_c;
  }
  return sizes;
}

// "zstd, 4 frames, 2.6 MiB stored for 7.6 MiB (2.97x)", "plain, 7.6 MiB",
// "plain, size not recorded".
std::string describe_storage(const image::BuildInfo& info) {
  if (!info.frame_table.compressed()) {
    return info.size == 0 ? "plain, size not recorded" : "plain, " + format_size(info.size);
  }
  const StoredSizes sizes = stored_sizes(info);
  return fmt::format(
      "{}, {} frames, {} stored for {} ({:.2f}x)", image::codec_name(info.frame_table.codec),
      info.frame_table.frames.size(), format_size(sizes.compressed),
      format_size(sizes.uncompressed),
      static_cast<double>(sizes.uncompressed) / static_cast<double>(sizes.compressed));
}

// The builds the device's bytes come from, newest generation first: the
// chain of ancestors that still contribute bytes (a v3 header records no
// parent, so the chain is read off the mappings and each build's header).
std::vector<ChainLink> build_chain(ObjectStore& store, const image::Header& header,
                                   const std::string& name, std::chrono::nanoseconds timeout) {
  std::vector<ChainLink> chain;
  std::set<image::Uuid> seen;
  for (const image::Mapping& m : header.mappings) {
    if (m.build_id.is_nil() || !seen.insert(m.build_id).second) continue;
    ChainLink link{m.build_id, std::nullopt, "", {m.build_id, 0, {}, {}}, 0};
    const image::BuildInfo* own_entry = nullptr;
    std::optional<image::Header> other;
    if (m.build_id == header.build_id) {
      link.generation = header.generation;
    } else if (Result<image::Header> loaded =
                   image::load_header(store, m.build_id, name, timeout)) {
      link.generation = loaded->generation;
      other = std::move(loaded).value();
      own_entry = other->find_build(m.build_id);
    } else {
      link.problem = loaded.status().message();
    }
    if (own_entry != nullptr) {
      link.info = *own_entry;
    } else if (const image::BuildInfo* entry = header.find_build(m.build_id)) {
      link.info = *entry;
    }
    chain.push_back(std::move(link));
  }
  for (const image::Mapping& m : header.mappings) {
    for (ChainLink& link : chain) {
      if (link.build == m.build_id) {
        link.mapped_end = std::max(link.mapped_end, m.build_storage_offset + m.length);
      }
    }
  }
  std::stable_sort(chain.begin(), chain.end(), [](const ChainLink& a, const ChainLink& b) {
    return a.generation.value_or(0) > b.generation.value_or(0);
  });
  return chain;
}

// Bytes of the device each build's data file serves ("zeros" for nil).
std::map<std::string, uint64_t> bytes_by_build(const image::Header& header) {
  std::map<std::string, uint64_t> bytes;
  for (const image::Mapping& m : header.mappings) {
    const uint64_t end = std::min(m.end(), header.size);
    if (end <= m.offset) continue;
    bytes[m.build_id.is_nil() ? "zeros" : m.build_id.to_string()] += end - m.offset;
  }
  return bytes;
}

int run_inspect(const InspectFlags& flags) {
  Result<Opened> opened = open_flags(flags.device);
  if (!opened) return report_failure(opened.status());
  Result<image::Header> header =
      image::load_header(opened->files->store(), opened->build, flags.device.name,
                         opened->files->options().fetch_timeout);
  if (!header) return report_failure(header.status().with_context("inspect"));
  const std::map<std::string, uint64_t> by_build = bytes_by_build(*header);
  const std::vector<ChainLink> chain = build_chain(
      opened->files->store(), *header, flags.device.name, opened->files->options().fetch_timeout);
  // --verify: every data file read whole and checked, the first problem
  // ending the command (exit 1).
  const auto verify = [&](const ChainLink& link) -> Result<image::DataFileCheck> {
    const IoContext io{Clock::time_point::max(), {}};
    Result<image::DataFileCheck> check = image::verify_data_file(
        opened->files->store(), flags.device.name, link.info, link.mapped_end, io);
    if (!check) {
      return check.status().with_context("inspect --verify: build " + link.build.to_string());
    }
    return check;
  };
  if (flags.json) {
    nlohmann::json links = nlohmann::json::array();
    for (const ChainLink& link : chain) {
      const StoredSizes sizes = stored_sizes(link.info);
      nlohmann::json entry = {
          {"build_id", link.build.to_string()},
          {"generation", link.generation ? nlohmann::json(*link.generation) : nlohmann::json()},
          {"codec", image::codec_name(link.info.frame_table.codec)},
          {"size", link.info.size != 0 ? nlohmann::json(link.info.size) : nlohmann::json()},
          {"frames", link.info.frame_table.frames.size()},
          {"frames_uncompressed_bytes", sizes.uncompressed},
          {"frames_compressed_bytes", sizes.compressed},
          {"ratio", sizes.compressed != 0 ? nlohmann::json(static_cast<double>(sizes.uncompressed) /
                                                           static_cast<double>(sizes.compressed))
                                          : nlohmann::json()}};
      if (flags.verify) {
        Result<image::DataFileCheck> check = verify(link);
        if (!check) return report_failure(check.status());
        entry["verified"] = {{"key", check->key},
                             {"stored_bytes", check->stored_bytes},
                             {"size", check->size},
                             {"frames", check->frames},
                             {"size_checked", check->size_checked},
                             {"sha256_checked", check->sha256_checked}};
      }
      links.push_back(std::move(entry));
    }
    nlohmann::json doc = {{"version", header->version},
                          {"block_size", header->block_size},
                          {"size", header->size},
                          {"generation", header->generation},
                          {"build_id", header->build_id.to_string()},
                          {"base_build_id", header->base_build_id.to_string()},
                          {"bytes_by_build", by_build},
                          {"chain", std::move(links)}};
    if (!flags.no_mappings) {
      nlohmann::json mappings = nlohmann::json::array();
      for (const image::Mapping& m : header->mappings) {
        mappings.push_back({{"offset", m.offset},
                            {"length", m.length},
                            {"build_id", m.build_id.to_string()},
                            {"build_storage_offset", m.build_storage_offset}});
      }
      doc["mappings"] = std::move(mappings);
    }
    std::printf("%s\n", doc.dump(2).c_str());
    return 0;
  }
  std::printf("%s of build %s\n", flags.device.name.c_str(), header->build_id.to_string().c_str());
  std::printf("  header version %llu, generation %llu, base build %s\n",
              static_cast<unsigned long long>(header->version),
              static_cast<unsigned long long>(header->generation),
              header->base_build_id.to_string().c_str());
  std::printf("  size %s (%llu bytes), blocks of %llu bytes, %zu mappings\n",
              format_size(header->size).c_str(), static_cast<unsigned long long>(header->size),
              static_cast<unsigned long long>(header->block_size), header->mappings.size());
  std::printf("  chain (the builds its bytes come from, newest first):\n");
  for (const ChainLink& link : chain) {
    const auto bytes = by_build.find(link.build.to_string());
    std::printf("    %-36s %s, %s; data file %s\n", link.build.to_string().c_str(),
                link.generation ? fmt::format("generation {}", *link.generation).c_str()
                                : fmt::format("header unreadable: {}", link.problem).c_str(),
                format_size(bytes == by_build.end() ? 0 : bytes->second).c_str(),
                describe_storage(link.info).c_str());
  }
  if (const auto zeros = by_build.find("zeros"); zeros != by_build.end()) {
    std::printf("    %-36s %s\n", "zeros", format_size(zeros->second).c_str());
  }
  if (flags.verify) {
    for (const ChainLink& link : chain) {
      Result<image::DataFileCheck> check = verify(link);
      if (!check) return report_failure(check.status());
      std::printf("  verified %s: %s bytes%s%s%s\n", check->key.c_str(),
                  fmt::format("{}", check->size).c_str(),
                  check->frames != 0 ? fmt::format(" in {} frames", check->frames).c_str() : "",
                  check->size_checked ? ", size as recorded" : "",
                  check->sha256_checked ? ", SHA-256 as recorded" : "");
    }
  }
  if (flags.no_mappings) return 0;
  constexpr size_t kShown = 50;
  std::printf("  mappings (offset, length, build, offset in its data file):\n");
  for (size_t i = 0; i < header->mappings.size() && i < kShown; ++i) {
    const image::Mapping& m = header->mappings[i];
    std::printf("    %14llu %12llu %-36s %14llu\n", static_cast<unsigned long long>(m.offset),
                static_cast<unsigned long long>(m.length),
                m.build_id.is_nil() ? "zeros" : m.build_id.to_string().c_str(),
                static_cast<unsigned long long>(m.build_storage_offset));
  }
  if (header->mappings.size() > kShown) {
    std::printf("    ... %zu more (--json lists them all)\n", header->mappings.size() - kShown);
  }
  return 0;
}

}  // namespace

CommandRunner add_pack_command(CLI::App& app) {
  auto flags = std::make_shared<PackFlags>();
  CLI::App* pack = app.add_subcommand(
      "pack",
      "Store a raw image as a build: only the blocks that differ from --parent (or, without a "
      "parent, that are not zeros) go to BUILD/NAME (with --compress, BUILD/NAME.zstd or "
      "BUILD/NAME.lz4: independently compressed frames, as E2B writes them); BUILD/NAME.header "
      "maps every block");
  add_device_flags(*pack, flags->device, StoreUse::kWrite);
  add_progress_flags(*pack);
  pack->add_option("--parent", flags->parent, "The build this one changes (a UUID)");
  pack->add_option("--block-size", flags->block_size,
                   "Unit of diffing and mapping: 4096 (disks, memory) or 2MiB (huge-page memory); "
                   "default: the parent's, or 4096");
  pack->add_flag("--force", flags->force,
                 "Replace the build if it exists already. Builds are meant to be immutable: its "
                 "children keep mapping into its old data file (and read a mix of generations), "
                 "and caches of it (--cache-dir) may hold its old chunks");
  pack->add_flag("--json", flags->json,
                 "Print the summary as one JSON document: blocks changed, zero, unchanged, bytes "
                 "stored, seconds");
  pack->add_option("--compress", flags->compress,
                   "Store the data file compressed: zstd or lz4, in frames of --frame-size "
                   "compressed in parallel on every core; the header is then version 4 (or "
                   "--header-version 5) and records the frames, the uncompressed size and the "
                   "SHA-256");
  pack->add_option("--frame-size", flags->frame_size,
                   "Uncompressed bytes per frame (a multiple of the block size, at most 64MiB): "
                   "the unit a cold read fetches and decompresses; default 2MiB, as E2B");
  pack->add_option("--level", flags->level,
                   "Compression level: zstd 1 to 22 (default 3; negative: faster), lz4 0 (fast, "
                   "the default) to 12 (high compression)");
  pack->add_option("--header-version", flags->header_version,
                   "The header's layout: 3 (plain builds only), 4 or 5 (E2B's compact mappings); "
                   "default: the parent's, and at least 4 with --compress, else 3")
      ->check(CLI::IsMember({3, 4, 5}));
  pack->add_option("FILE", flags->input, "The raw image; - for stdin");
  pack->add_option("--overlay", flags->overlay,
                   "Instead of FILE: an overlay kept by `serve nbd --overlay` over --parent's "
                   "disk; only its blocks are read");
  return [flags] { return run_pack(*flags); };
}

CommandRunner add_export_command(CLI::App& app) {
  auto flags = std::make_shared<ExportFlags>();
  CLI::App* command = app.add_subcommand(
      "export", "Write a build's whole device to a file (sparse where it reads zeros) or stdout");
  add_device_flags(*command, flags->device);
  add_progress_flags(*command);
  command->add_option("-o,--output", flags->output,
                      "Output: a file (replaced whole only once complete), a device or a FIFO "
                      "(written in place); - for stdout, the default unless it is a terminal");
  return [flags] { return run_export(*flags); };
}

CommandRunner add_inspect_command(CLI::App& app) {
  auto flags = std::make_shared<InspectFlags>();
  CLI::App* command = app.add_subcommand(
      "inspect",
      "Show a build's header: its version, metadata, the builds its bytes come from (each with "
      "its codec, frames, stored and uncompressed sizes), the mappings");
  add_device_flags(*command, flags->device);
  command->add_flag("--json", flags->json, "Print one JSON document");
  command->add_flag("--no-mappings", flags->no_mappings,
                    "Leave the mappings out (the summary and the chain of builds only)");
  command->add_flag("--verify", flags->verify,
                    "Read every data file the device uses whole and check it: each frame's "
                    "checksum and decompressed size, and the file's size and SHA-256 where the "
                    "header records them; the first problem (naming the object and frame) exits 1");
  return [flags] { return run_inspect(*flags); };
}

}  // namespace lazyblock::cli
