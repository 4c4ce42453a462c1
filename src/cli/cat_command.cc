// lazyblock cat --store URL --key KEY [-o FILE]: one raw object, through a
// chunker, to stdout or a file.
#include <memory>

#include "chunk/chunker.h"
#include "cli/commands.h"
#include "cli/flags.h"
#include "cli/output.h"
#include "cli/stream_copy.h"
#include "common/byte_sink.h"
#include "common/log.h"
#include "common/output_file.h"

namespace lazyblock::cli {
namespace {

struct CatFlags {
  StoreFlags store;
  std::string key;
  std::string output;
  std::string log_level = "warn";
};

int run_cat(const CatFlags& flags) {
  if (Status s = apply_log_level(flags.log_level); !s.is_ok()) return report_failure(s);
  Result<std::unique_ptr<OutputFile>> output = OutputFile::open(flags.output);
  if (!output) return report_failure(output.status());
  Result<ChunkerOptions> options = chunker_options(flags.store);
  if (!options) return report_failure(options.status());
  prepare_for_streaming(*options);
  Result<StoreStackOptions> stack = store_stack_options(flags.store);
  if (!stack) return report_failure(stack.status());
  Result<std::shared_ptr<ObjectStore>> store = open_store(flags.store.store, *stack);
  if (!store) return report_failure(store.status());
  Status status;
  Progress progress("cat " + flags.key, 0);
  ProgressSink counted((*output)->sink(), progress);
  if ((*output)->is_block_device()) {
    // Only a device needs the size before the first byte (a stat more).
    Result<uint64_t> size =
        (*store)->stat(flags.key, IoContext{Clock::now() + options->fetch_timeout, {}});
    status = size ? (*output)->expect_size(*size) : size.status();
  }
  uint64_t bytes = 0, requests = 0;
  if (status.is_ok() && options->parallel == 1) {
    // One stream: nothing is fetched ahead of the writer, so nothing needs
    // a cache.
    Result<StreamedObject> streamed = stream_object(**store, flags.key, *options, counted);
    status = streamed.status();
    if (streamed) bytes = streamed->bytes, requests = streamed->requests;
  } else if (status.is_ok()) {
    Result<std::unique_ptr<Chunker>> chunker =
        make_chunker(*store, flags.key, std::nullopt, *options);
    status = chunker.status();
    if (chunker) {
      status = stream_in_order(source_of(**chunker), counted, *options);
      bytes = (*chunker)->stats().bytes, requests = (*chunker)->stats().requests;
    }
  }
  if (status.is_ok()) status = (*output)->commit();
  // The errors name the store, the key and the range, or the output file.
  if (!status.is_ok()) return report_failure(status);
  log(LogLevel::kInfo, "cat {}: {} bytes in {} requests", flags.key, bytes, requests);
  return 0;
}

}  // namespace

CommandRunner add_cat_command(CLI::App& app) {
  auto flags = std::make_shared<CatFlags>();
  CLI::App* cat =
      app.add_subcommand("cat", "Write one raw object of a store (no header) to stdout or a file");
  add_store_flags(*cat, flags->store);
  add_progress_flags(*cat);
  cat->add_option("--key", flags->key, "The object's key, e.g. BUILD/memfile")->required();
  cat->add_option("-o,--output", flags->output,
                  "Output: a file (replaced whole only once complete), a device or a FIFO "
                  "(written in place); - for stdout, the default unless it is a terminal");
  add_log_flag(*cat, flags->log_level);
  return [flags] { return run_cat(*flags); };
}

}  // namespace lazyblock::cli
