// The lazyblock command: see the README for what each command does.
#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "cli/flags.h"

namespace {

// How many single-character edits turn `a` into `b`.
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// "unknown command 'packk' (did you mean 'pack'?)" if `word` names none of
// `app`'s subcommands; empty if it names one.
std::string unknown_command(const CLI::App& app, std::string_view word, std::string_view path) {
  std::string closest;
  size_t best = 3;  // suggest only what is a typo away
  for (const CLI::App* sub : app.get_subcommands({})) {
    if (sub->get_name() == word) return "";
    const size_t distance = edit_distance(word, sub->get_name());
    if (distance < best) {
      best = distance;
      closest = sub->get_name();
    }
  }
  std::string message = "unknown command '" + std::string(path) + std::string(word) + "'";
  if (!closest.empty()) message += " (did you mean '" + std::string(path) + closest + "'?)";
  return message + "; `lazyblock --help` lists the commands";
}

}  // namespace

int main(int argc, char** argv) {
  using namespace lazyblock::cli;
  CLI::App app(
      "lazyblock serves VM snapshots (guest memory and disks) from object storage on demand, "
      "fetching 4 MiB chunks into a local cache and waking each reader as its bytes arrive.",
      "lazyblock");
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for every command");
  app.set_version_flag("--version", std::string("lazyblock ") + LAZYBLOCK_VERSION);
  add_global_flags(app);

  CommandRunner cat = add_cat_command(app);
  CommandRunner pack = add_pack_command(app);
  CommandRunner export_ = add_export_command(app);
  CommandRunner inspect = add_inspect_command(app);
  CommandRunner serve = add_serve_command(app);
  CommandRunner daemon = add_daemon_command(app);
  CommandRunner bench = add_bench_command(app);

  // A mistyped command gets a word of advice rather than CLI11's "A
  // subcommand is required" (which is true, and no help).
  const CLI::App* level = &app;
  std::string path;
  for (int i = 1; i < argc && !level->get_subcommands({}).empty(); ++i) {
    const std::string_view word = argv[i];
    // A global flag before the command, and its value.
    if (level == &app && word == "--log-level") {
      ++i;
      continue;
    }
    if (level == &app && word.rfind("--log-level=", 0) == 0) continue;
    if (word.empty() || word.front() == '-') break;
    if (const std::string unknown = unknown_command(*level, word, path); !unknown.empty()) {
      std::fprintf(stderr, "lazyblock: usage: %s\n", unknown.c_str());
      return kExitUsage;
    }
    level = level->get_subcommand(std::string(word));
    path += std::string(word) + " ";
  }

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::fprintf(stderr, "lazyblock: usage: %s (see `lazyblock %s--help`)\n", e.what(),
                 path.c_str());
    return kExitUsage;
  }
  if (app.got_subcommand("cat")) return cat();
  if (app.got_subcommand("pack")) return pack();
  if (app.got_subcommand("export")) return export_();
  if (app.got_subcommand("inspect")) return inspect();
  if (app.got_subcommand("serve")) return serve();
  if (app.got_subcommand("daemon")) return daemon();
  if (app.got_subcommand("bench")) return bench();
  return kExitUsage;
}
