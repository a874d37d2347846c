//! `secretfs mount MOUNTPOINT`, and the mount inside `secretfs dev`;
//! `--background` in `background`.

mod background;

pub use background::Launch;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use secretfs_mount::{CallerRules, CredentialFiles, Force, MountOptions, Notify, MOUNT_KEEPS};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::args::{ConnArgs, MountArgs};
use crate::connect;

/// The part of `secretfs mount` that runs before the async runtime: read
/// the certificate and key, then drop every capability but the mount's
/// while this is the only thread (capabilities are per thread, and every
/// thread made later copies its creator's).
///
/// Its errors are also sent to a supervisor (`NOTIFY_SOCKET`: systemd, or
/// the parent of `--background`), which shows them.
pub fn prepare(conn: &ConnArgs, args: MountArgs) -> Result<MountOptions> {
    let notify = Notify::from_env();
    prepare_mount(conn, args, notify.clone()).inspect_err(|err| {
        if let Some(n) = &notify {
            n.failed(&crate::fail::message(err));
        }
    })
}

fn prepare_mount(conn: &ConnArgs, args: MountArgs, notify: Option<Notify>) -> Result<MountOptions> {
    if args.background_child {
        // Started by `--background`: out of the terminal's session, so
        // neither its hangup nor its Ctrl-C reaches the mount.
        if let Err(e) = rustix::process::setsid() {
            tracing::debug!(error = %e, "setsid failed; already a session leader");
        }
    }
    let mut opts = MountOptions::new(&args.mountpoint, connect::config(conn)?);
    opts.default_uid = args.uid;
    opts.default_gid = args.gid;
    opts.default_mode = args.mode;
    opts.refresh = args.refresh;
    opts.start_timeout = args.start_timeout;
    opts.max_stale = args.max_stale;
    opts.force = Force {
        uid: args.force_uid,
        gid: args.force_gid,
        mode: args.force_mode,
    };
    opts.create_mountpoint = args.create_mountpoint;
    opts.renew = !args.no_renew;
    opts.renew_after = args.renew_after;
    opts.notify = notify;
    // connect::config read these paths already, so all three are set.
    if let (Some(cert), Some(key), Some(ca)) = (&conn.cert, &conn.key, &conn.ca) {
        opts.credentials = Some(CredentialFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        });
    }
    if args.force_mode.is_some_and(|m| m & 0o004 != 0)
        && args.containers.is_empty()
        && args.allow_cgroups.is_empty()
    {
        tracing::warn!(
            "--force-mode {:04o} lets every process on this host read every secret file, and no caller \
             check (--container/--allow-cgroup) narrows it",
            args.force_mode.unwrap_or_default()
        );
    }
    if !args.containers.is_empty() || !args.allow_cgroups.is_empty() {
        opts.callers = Some(CallerRules {
            container_ids: args.containers,
            allow_cgroups: args.allow_cgroups,
            public_status: args.public_status,
        });
    } else if args.strict_status || args.public_status {
        let flag = if args.public_status {
            "--public-status"
        } else {
            "--strict-status"
        };
        return Err(crate::fail::UsageError(format!(
            "{flag} goes with the caller check: add --container ID or --allow-cgroup PATH"
        ))
        .into());
    }
    // This process does nothing but serve the mount: keep only what that
    // needs. A mount that cannot drop the rest does not run.
    let report = secretfs_mount::drop_privileges(MOUNT_KEEPS)
        .context("not mounting: the mount must drop every capability but CAP_SYS_ADMIN and CAP_IPC_LOCK first")?;
    if report.not_held.is_empty() {
        tracing::info!(%report, "dropped privileges");
    } else {
        tracing::warn!(
            %report,
            "the mount runs without capabilities it uses: grant them to the mount's process \
             (AmbientCapabilities= in its systemd unit, or --cap-add for a container)"
        );
    }
    opts.privileges = Some(report);
    Ok(opts)
}

/// Serves the mount [`prepare`] set up until SIGINT or SIGTERM.
pub async fn run(opts: MountOptions) -> Result<()> {
    let notify = opts.notify.clone();
    let result = match super::shutdown_signal() {
        Ok(stop) => secretfs_mount::run(opts, stop)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    if let (Err(err), Some(n)) = (&result, &notify) {
        n.failed(&crate::fail::message(err));
    }
    result
}

/// A mount running in the background of `secretfs dev`.
pub struct DevMount {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), secretfs_mount::MountError>>,
}

impl DevMount {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("unmounting failed: {e}"),
            Err(e) => eprintln!("the mount task failed: {e}"),
        }
    }
}

/// Mounts `conn`'s secrets at `mountpoint` and waits until they show.
pub async fn start_dev_mount(conn: &ConnArgs, mountpoint: &Path) -> Result<DevMount> {
    std::fs::create_dir_all(mountpoint)?;
    let opts = MountOptions::new(mountpoint, connect::config(conn)?);
    let (stop, stopped) = oneshot::channel::<()>();
    let mut task = tokio::spawn(secretfs_mount::run(opts, async {
        let _ = stopped.await;
    }));
    let status = mountpoint.join(".secretfs/status");
    let deadline = Instant::now() + Duration::from_secs(35);
    loop {
        if status.exists() {
            return Ok(DevMount { stop, task });
        }
        if task.is_finished() {
            return match (&mut task).await {
                Ok(Err(e)) => Err(e.into()),
                Ok(Ok(())) => bail!("the mount stopped at once"),
                Err(e) => bail!("the mount task failed: {e}"),
            };
        }
        if Instant::now() > deadline {
            let _ = stop.send(());
            bail!(
                "the mount did not appear at {} in time",
                mountpoint.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::args::{Cli, Command};

    #[test]
    fn a_failed_privilege_drop_stops_the_mount() {
        // A second thread makes the drop refuse: `prepare` must fail
        // rather than carry on with every privilege.
        let (hold, held) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            let _ = held.recv();
        });
        let dir = std::env::temp_dir().join(format!("secretfs-prepare-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_str().unwrap().to_owned()
        };
        // Files that pass the checks made before connecting.
        let (issuer, _) = secretfs_server::pki::Ca::generate("test.local").unwrap();
        let issued = issuer.issue_client("test.local", "app", 30).unwrap();
        let (ca, cert, key) = (
            file("ca.pem", &issuer.cert_pem),
            file("cert.pem", &issued.cert_pem),
            file("key.pem", issued.key_pem.as_deref().unwrap()),
        );
        let mountpoint = dir.join("mnt");
        let cli = Cli::parse_from([
            "secretfs",
            "--server",
            "https://127.0.0.1:1",
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "mount",
            mountpoint.to_str().unwrap(),
        ]);
        let Command::Mount(args) = cli.command else {
            panic!("parsed as another command");
        };
        let err = super::prepare(&cli.conn, args).unwrap_err();
        drop(hold);
        let _ = other.join();
        let _ = std::fs::remove_dir_all(&dir);
        let text = format!("{err:#}");
        assert!(
            text.contains("not mounting") && text.contains("one thread"),
            "{text}"
        );
    }
}
