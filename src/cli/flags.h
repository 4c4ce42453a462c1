// Flags shared by the lazyblock commands, and how their text becomes options.
#pragma once

#include <string>

#include <CLI/CLI.hpp>

#include "chunk/chunker.h"
#include "common/status.h"
#include "storage/store_url.h"

namespace lazyblock::cli {

// Exit statuses (DESIGN.md): 1 for an operational error, 2 for a usage error.
constexpr int kExitError = 1;
constexpr int kExitUsage = 2;

// The flags every command that reads a store takes, as typed.
struct StoreFlags {
  std::string store;
  std::string fetch = "split";
  std::string simulate;
  std::string faults;
  std::string timeout = "60s";
  int parallel = 8;
  std::string retry = "deadline";  // or a count; 0 = off
  std::string cache_dir;
  std::string cache_size = "16GiB";
  bool no_readahead = false;
  std::string ca_file;
};

// What a command does with its store, and so which of the store flags it
// takes: how to fetch and cache what is read (--fetch, --parallel,
// --cache-dir, ...) is only for commands that read; pack writes (and reads
// its parent, if any, with the defaults).
enum class StoreUse { kRead, kWrite };

// The store flags, in help groups: "Store" (where and how to reach it),
// "Reading" (fetching and caching) and "Testing" (--faults, --simulate).
void add_store_flags(CLI::App& command, StoreFlags& flags, StoreUse use = StoreUse::kRead);

// A check that a whole number is at least `least`, saying so in words
// ("must be a whole number of at least 1") rather than CLI11's range of
// doubles.
CLI::Validator at_least(long long least);

// --log-level, for every command; also taken before the command
// (add_global_flags), where it applies unless the command's own is given.
void add_log_flag(CLI::App& command, std::string& level);
// The flags that may come before the command: --log-level.
void add_global_flags(CLI::App& app);

// --progress / --quiet, for the commands that move whole images; applied
// when the command line is parsed.
void add_progress_flags(CLI::App& command);
Status apply_log_level(const std::string& level);

// The options the flags stand for; kInvalidArgument (a usage error) if any
// is malformed.
Result<ChunkerOptions> chunker_options(const StoreFlags& flags);
Result<StoreStackOptions> store_stack_options(const StoreFlags& flags);

// Prints `status` as "lazyblock: error: ..." (or "lazyblock: usage: ..." for
// kInvalidArgument) and returns the exit status it calls for.
int report_failure(const Status& status);

}  // namespace lazyblock::cli
