// The lazyblock subcommands. Each registers itself on the app and returns the
// function that runs it once the command line is parsed.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace lazyblock::cli {

// Runs a parsed command; returns the process's exit status.
using CommandRunner = std::function<int()>;

CommandRunner add_cat_command(CLI::App& app);
CommandRunner add_bench_command(CLI::App& app);
CommandRunner add_pack_command(CLI::App& app);
CommandRunner add_export_command(CLI::App& app);
CommandRunner add_inspect_command(CLI::App& app);
CommandRunner add_serve_command(CLI::App& app);
CommandRunner add_daemon_command(CLI::App& app);

}  // namespace lazyblock::cli
