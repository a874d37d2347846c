//! One module per command family; `run` dispatches.

mod client;
mod dev;
mod group;
mod identity;
mod mount;
mod secret;
mod server;

use anyhow::Result;

use secretfs_mount::MountOptions;

use crate::args::{Cli, Command};

/// A command whose part that must run before any thread exists has run.
pub enum Ready {
    /// `secretfs mount`: files read, privileges dropped.
    Mount(MountOptions),
    Other(Cli),
}

/// Runs what must happen while the process has one thread, before the
/// async runtime starts its own.
pub fn prepare(cli: Cli) -> Result<Ready> {
    match cli.command {
        Command::Mount(args) => Ok(Ready::Mount(mount::prepare(&cli.conn, args)?)),
        _ => Ok(Ready::Other(cli)),
    }
}

pub async fn run(ready: Ready) -> Result<()> {
    let cli = match ready {
        Ready::Mount(opts) => return mount::run(opts).await,
        Ready::Other(cli) => cli,
    };
    let format = cli.output;
    match cli.command {
        Command::Server(cmd) => server::run(cmd, format).await,
        // Normally prepared already; this way only privileges stay put.
        Command::Mount(args) => mount::run(mount::prepare(&cli.conn, args)?).await,
        Command::Dev(args) => dev::run(args).await,
        Command::Secret(cmd) => secret::run(&cli.conn, cmd, format).await,
        Command::Client(cmd) => client::run(&cli.conn, cmd, format).await,
        Command::Group(cmd) => group::run(&cli.conn, cmd, format).await,
        Command::Access { client } => identity::access(&cli.conn, &client, format).await,
        Command::Whoami => identity::whoami(&cli.conn, format).await,
        Command::Read { name } => identity::read(&cli.conn, &name).await,
        Command::Audit(args) => identity::audit(&cli.conn, args, format).await,
    }
}

/// Waits for SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
