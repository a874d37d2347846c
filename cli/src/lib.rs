//! The `secretfs` command line: one binary for the server, the mount, the
//! operator commands and the one-command dev setup.
//!
//! - `args`: the clap definitions (the whole command surface in one place).
//! - `connect`: connection settings from flags/`SECRETFS_*` into a channel;
//!   the client's files are checked first, every call is bounded by `--timeout`.
//! - `confirm`: asking on a terminal before a removal (`--yes` skips it).
//! - `output`: text tables and `--output json`.
//! - `input`: reading secret content from stdin or a file, never argv.
//! - `fail`: turning errors into messages that say what to do, and exit codes.
//! - `commands::*`: one module per command family.

#![forbid(unsafe_code)]

mod args;
mod commands;
mod confirm;
mod connect;
mod fail;
mod input;
mod output;

use std::process::ExitCode;

/// Exit code for usage errors (clap uses it too).
pub const EXIT_USAGE: u8 = 2;

pub fn main() -> ExitCode {
    // Parsed from the matches, which also say where --database came from
    // (a password is refused in argv, not in the environment).
    let matches = <args::Cli as clap::CommandFactory>::command().get_matches();
    let mut cli = match <args::Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    commands::server::note_database_source(&mut cli, &matches);
    // Before any thread starts (no runtime yet, no mount, no tracing).
    commands::server::take_environment();
    init_tracing(&cli);
    let ready = match commands::prepare(cli) {
        Ok(ready) => ready,
        Err(err) => return fail::report(&err),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(ready)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail::report(&err),
    }
}

fn init_tracing(cli: &args::Cli) {
    use tracing_subscriber::EnvFilter;
    // fuser logs each request it has no handler for at warn: noise here.
    let default = if cli.is_long_running() {
        "info,fuser=error"
    } else {
        "warn,fuser=error"
    };
    let filter =
        EnvFilter::try_from_env("SECRETFS_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
