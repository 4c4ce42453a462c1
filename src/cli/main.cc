// The lazyblock command: see DESIGN.md's "Command line" for the contract.
#include <CLI/CLI.hpp>

#include "cli/commands.h"
#include "cli/flags.h"

int main(int argc, char** argv) {
  using namespace lazyblock::cli;
  CLI::App app(
      "lazyblock serves VM snapshots (guest memory and disks) from object storage on demand, "
      "fetching 4 MiB chunks into a local cache and waking each reader as its bytes arrive.",
      "lazyblock");
  app.require_subcommand(1);
  app.set_help_all_flag("--help-all", "Show help for every command");

  CommandRunner cat = add_cat_command(app);
  CommandRunner pack = add_pack_command(app);
  CommandRunner export_ = add_export_command(app);
  CommandRunner inspect = add_inspect_command(app);
  CommandRunner serve = add_serve_command(app);
  CommandRunner bench = add_bench_command(app);

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    app.exit(e);
    return kExitUsage;
  }
  if (app.got_subcommand("cat")) return cat();
  if (app.got_subcommand("pack")) return pack();
  if (app.got_subcommand("export")) return export_();
  if (app.got_subcommand("inspect")) return inspect();
  if (app.got_subcommand("serve")) return serve();
  if (app.got_subcommand("bench")) return bench();
  return kExitUsage;
}
