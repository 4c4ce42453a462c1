// lazyblock cat --store URL --key KEY [-o FILE]: one raw object, through a
// chunker, to stdout or a file.
#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <memory>

#include "chunk/chunker.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "common/byte_sink.h"
#include "common/log.h"

namespace lazyblock::cli {
namespace {

struct CatFlags {
  StoreFlags store;
  std::string key;
  std::string output = "-";
  std::string log_level = "warn";
};

// Writes the object to `path` through a temporary file beside it, renamed
// into place only once every byte is written: a failed cat leaves no file
// that looks complete.
Status write_file(Chunker& chunker, const std::string& path) {
  const std::filesystem::path target(path);
  std::string temp = (target.parent_path().empty() ? std::filesystem::path(".")
                                                   : target.parent_path()) /
                     ("." + target.filename().string() + ".partial-XXXXXX");
  const int fd = ::mkostemp(temp.data(), O_CLOEXEC);
  if (fd < 0) return posix_error("create a file beside " + path, errno);
  FdSink sink(fd, path);
  Status status = chunker.write_to(sink);
  if (status.is_ok() && ::fsync(fd) != 0) status = posix_error("flush " + path, errno);
  if (::close(fd) != 0 && status.is_ok()) status = posix_error("close " + path, errno);
  if (status.is_ok() && ::rename(temp.c_str(), path.c_str()) != 0) {
    status = posix_error("rename into " + path, errno);
  }
  if (!status.is_ok()) ::unlink(temp.c_str());
  return status;
}

int run_cat(const CatFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  Result<ChunkerOptions> options = chunker_options(flags.store);
  if (!options) return report_failure(options.status());
  Result<StoreStackOptions> stack = store_stack_options(flags.store);
  if (!stack) return report_failure(stack.status());
  Result<std::shared_ptr<ObjectStore>> store = open_store(flags.store.store, *stack);
  if (!store) return report_failure(store.status());
  Result<std::unique_ptr<Chunker>> chunker =
      make_chunker(*store, flags.key, std::nullopt, *options);
  if (!chunker) return report_failure(chunker.status());

  Status status;
  if (flags.output == "-") {
    FdSink sink(STDOUT_FILENO, "stdout");
    status = (*chunker)->write_to(sink);
  } else {
    status = write_file(**chunker, flags.output);
  }
  if (!status.is_ok()) return report_failure(status.with_context("cat " + flags.key));
  const ChunkerStats stats = (*chunker)->stats();
  log(LogLevel::kInfo, "cat {}: {} bytes in {} requests", flags.key, stats.bytes, stats.requests);
  return 0;
}

}  // namespace

CommandRunner add_cat_command(CLI::App& app) {
  auto flags = std::make_shared<CatFlags>();
  CLI::App* cat = app.add_subcommand(
      "cat", "Write one raw object of a store (no header) to stdout or a file");
  add_store_flags(*cat, flags->store);
  cat->add_option("--key", flags->key, "The object's key, e.g. BUILD/memfile")->required();
  cat->add_option("-o,--output", flags->output, "Output file; - for stdout")
      ->capture_default_str();
  add_log_flag(*cat, flags->log_level);
  return [flags] { return run_cat(*flags); };
}

}  // namespace lazyblock::cli
