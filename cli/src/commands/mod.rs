//! One module per command family; `run` dispatches.

mod audit;
mod client;
mod dev;
mod group;
mod identity;
mod mount;
mod secret;
pub mod server;

use anyhow::Result;

use secretfs_mount::MountOptions;

use crate::args::{Cli, Command, ConnArgs, Format, OtherCommand};

/// A command whose part that must run before any thread exists has run.
// One value per process, moved once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Ready {
    /// `secretfs mount`: files read, privileges dropped.
    Mount(MountOptions),
    /// `secretfs mount --background`: start the mount as a child and wait
    /// for it; this process keeps its privileges and mounts nothing.
    Background(mount::Launch),
    /// Any other command: nothing to do before the runtime.
    Other {
        conn: ConnArgs,
        output: Format,
        command: OtherCommand,
    },
}

/// Runs what must happen while the process has one thread, before the
/// async runtime starts its own.
pub fn prepare(cli: Cli) -> Result<Ready> {
    match cli.command {
        Command::Mount(args) if args.background => Ok(Ready::Background(mount::Launch::new(&args))),
        Command::Mount(args) => Ok(Ready::Mount(mount::prepare(&cli.conn, args)?)),
        Command::Other(command) => Ok(Ready::Other {
            conn: cli.conn,
            output: cli.output,
            command,
        }),
    }
}

pub async fn run(ready: Ready) -> Result<()> {
    let (conn, format, command) = match ready {
        Ready::Mount(opts) => return mount::run(opts).await,
        Ready::Background(launch) => {
            return tokio::task::spawn_blocking(move || launch.run())
                .await
                .map_err(|e| anyhow::anyhow!("the background launcher failed: {e}"))?
        }
        Ready::Other {
            conn,
            output,
            command,
        } => (conn, output, command),
    };
    match command {
        OtherCommand::Server(cmd) => server::run(&conn, cmd, format).await,
        OtherCommand::Dev(args) => dev::run(args).await,
        OtherCommand::Secret(cmd) => secret::run(&conn, cmd, format).await,
        OtherCommand::Client(cmd) => client::run(&conn, cmd, format).await,
        OtherCommand::Group(cmd) => group::run(&conn, cmd, format).await,
        OtherCommand::Access { client } => identity::access(&conn, &client, format).await,
        OtherCommand::Whoami => identity::whoami(&conn, format).await,
        OtherCommand::Read { name } => identity::read(&conn, &name, format).await,
        OtherCommand::Audit(args) => audit::run(&conn, args, format).await,
    }
}

/// Listens for SIGINT and SIGTERM from this call on (an `async fn` would
/// listen only once polled, and a signal before that would kill the
/// process, leaving a mount or an address file behind); the future ends at
/// the first of them. Needs the runtime.
pub fn shutdown_signal() -> Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use anyhow::Context;
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rustix::process::{getpid, kill_process, Signal};

    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_not_lost() {
        let stop = super::shutdown_signal().unwrap();
        // Before anything awaits `stop`, as when a signal comes while the
        // server writes its address file or dev prints its lines.
        kill_process(getpid(), Signal::TERM).unwrap();
        tokio::time::timeout(Duration::from_secs(10), stop)
            .await
            .expect("SIGTERM ends the wait");
    }
}
