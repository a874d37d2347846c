//! `secretfs server init|run|admin-cert|reissue-cert|verify`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use secretfs_server::{InitOptions, RunOptions, Server, StateDir};
use serde_json::json;

use crate::args::{Format, ServerCmd, ServerSub, VerifyArgs};

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The lines that point the CLI at a server as the admin in `dir`.
pub fn export_lines(dir: &StateDir, server: &str) -> String {
    format!(
        "export SECRETFS_SERVER=https://{server}\n\
         export SECRETFS_CA={}\n\
         export SECRETFS_CERT={}\n\
         export SECRETFS_KEY={}\n",
        absolute(&dir.ca_cert()).display(),
        absolute(&dir.admin_cert()).display(),
        absolute(&dir.admin_key()).display(),
    )
}

/// Writes `--address-file` whole or not at all (a reader sees the whole
/// file or none). It holds no secret (mode 0644).
fn write_address_file(path: &Path, addr: SocketAddr, health: Option<SocketAddr>) -> Result<()> {
    let text = serde_json::to_string(&json!({
        "addr": addr.to_string(),
        "health_addr": health.map(|a| a.to_string()),
    }))?;
    secretfs_proto::files::replace_file(path, format!("{text}\n").as_bytes(), 0o644).with_context(
        || {
            format!(
                "cannot write the address file {} (--address-file); check that its directory exists and is writable",
                path.display()
            )
        },
    )
}

pub async fn run(cmd: ServerCmd, format: Format) -> Result<()> {
    match cmd.command {
        ServerSub::Init(a) => {
            let opts = InitOptions {
                state_dir: a.state_dir.clone(),
                trust_domain: a.trust_domain,
                sans: a.sans,
                admin_name: "admin".into(),
            };
            let dir = tokio::task::spawn_blocking(move || secretfs_server::init(&opts)).await??;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "state_dir": absolute(&dir.path),
                        "server": format!("https://{}", a.advertise),
                        "ca": absolute(&dir.ca_cert()),
                        "cert": absolute(&dir.admin_cert()),
                        "key": absolute(&dir.admin_key()),
                        "master_key": absolute(&dir.master_key()),
                    }))?
                ),
                Format::Text => {
                    eprintln!("created state directory {}", absolute(&dir.path).display());
                    eprintln!(
                        "back up {} apart from the database: without it no secret can be decrypted",
                        absolute(&dir.master_key()).display()
                    );
                    eprintln!(
                        "start the server:  secretfs server run --state-dir {}",
                        absolute(&dir.path).display()
                    );
                    eprintln!("then, to use the CLI as the admin:");
                    print!("{}", export_lines(&dir, &a.advertise));
                }
            }
            Ok(())
        }
        ServerSub::AdminCert(a) => {
            // clap refuses --days outside 1..=3650; 0 means the default.
            let days = a.days.unwrap_or(0);
            let made = tokio::task::spawn_blocking(move || {
                secretfs_server::host_certs::admin_cert(&a.state_dir, &a.out, &a.name, days)
            })
            .await??;
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "name": made.name, "created": made.created, "cert_serial": made.serial,
                        "cert_not_after": crate::output::time(made.not_after),
                        "cert": absolute(&made.cert), "key": absolute(&made.key), "ca": absolute(&made.ca),
                    }))?
                ),
                Format::Text => {
                    eprintln!(
                        "minted an admin certificate for {}{} (serial {}, valid until {}); audited as local:admin-cert",
                        made.name,
                        if made.created { " (client created)" } else { "" },
                        made.serial,
                        crate::output::time(made.not_after)
                    );
                    eprintln!("to use the CLI as this admin:");
                    println!(
                        "export SECRETFS_CA={}\nexport SECRETFS_CERT={}\nexport SECRETFS_KEY={}",
                        absolute(&made.ca).display(),
                        absolute(&made.cert).display(),
                        absolute(&made.key).display()
                    );
                }
            }
            Ok(())
        }
        ServerSub::Verify(a) => verify(a, format).await,
        ServerSub::ReissueCert(a) => {
            let sans = a.sans.clone();
            let state_dir = a.state_dir.clone();
            let issued = tokio::task::spawn_blocking(move || {
                secretfs_server::host_certs::reissue_server_cert(&state_dir, &sans)
            })
            .await??;
            let dir = StateDir::new(&a.state_dir);
            match format {
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "sans": a.sans, "serial": issued.serial,
                        "not_after": crate::output::time(issued.not_after),
                        "cert": absolute(&dir.server_cert()), "key": absolute(&dir.server_key()),
                    }))?
                ),
                Format::Text => println!(
                    "issued a new server certificate for {} (valid until {}) in {}; a running server takes it up within a second",
                    a.sans.join(", "),
                    crate::output::time(issued.not_after),
                    absolute(&dir.server_cert()).display()
                ),
            }
            Ok(())
        }
        ServerSub::Run(a) => {
            // Listening before the address file says the server is up.
            let stop = super::shutdown_signal()?;
            let server = Server::open(RunOptions {
                state_dir: a.state_dir,
                listen: a.listen,
                max_secret_size: a.max_secret_size,
                client_ca: a.client_ca,
                health_listen: a.health_listen,
                max_connections: a.max_connections,
                integrity_check: std::time::Duration::from_secs(a.integrity_check_secs),
            })
            .await
            .context("the server did not start")?;
            if let Some(path) = &a.address_file {
                write_address_file(path, server.local_addr(), server.health_addr())?;
            }
            server.serve(stop).await?;
            Ok(())
        }
    }
}

/// `server verify`: every bad row and the row set's finding, and exit 1
/// when there is any; with `--accept`, the rows as they are taken as the
/// row set (asked first on a terminal).
async fn verify(a: VerifyArgs, format: Format) -> Result<()> {
    let dir = StateDir::new(&a.state_dir);
    let database = absolute(&dir.database());
    let checking = dir.clone();
    let found = tokio::task::spawn_blocking(move || secretfs_server::row_review::verify(&checking))
        .await??;
    let (set, bad): (Vec<_>, Vec<_>) = found
        .into_iter()
        .partition(|r| r.table == secretfs_server::store::integrity::ROW_SET);
    let set = set.into_iter().next();
    if a.accept {
        if crate::confirm::wanted(a.yes) {
            let what = match &set {
                Some(f) => f.what.clone(),
                None => "the row set agrees with the rows".to_owned(),
            };
            crate::confirm::ask(&format!(
                "{what}. Take the rows of {} as they are now as the row set (bad rows stay bad)?",
                database.display()
            ))?;
        }
        let revision =
            tokio::task::spawn_blocking(move || secretfs_server::row_review::accept(&dir))
                .await??;
        match format {
            Format::Json => println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "database": database, "accepted": true, "revision": revision,
                    "bad_rows": bad,
                }))?
            ),
            Format::Text => println!(
                "the rows of {} as they are at revision {revision} are now the row set (audited as integrity.accept)",
                database.display()
            ),
        }
        if bad.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "the row set was accepted, but bad rows remain ({}; `secretfs server verify` lists them): \
             accepting the row set does not make a row good; restore the database from a backup",
            bad.len()
        );
    }
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "database": database, "clean": bad.is_empty() && set.is_none(),
                "bad_rows": bad, "row_set": set.as_ref().map(|f| &f.what),
            }))?
        ),
        Format::Text if bad.is_empty() && set.is_none() => {
            println!("every authenticated row of {} is good, and no row was put back, deleted or added without the key", database.display())
        }
        Format::Text => {
            for row in bad.iter().chain(&set) {
                println!("{}", crate::output::printable(&row.to_string()));
            }
        }
    }
    let set_text = set
        .as_ref()
        .map(|f| format!("{} ({})", f.what, database.display()));
    if bad.is_empty() {
        return match set_text {
            Some(text) => Err(anyhow::anyhow!(text)),
            None => Ok(()),
        };
    }
    anyhow::bail!(
        "{} bad row{} in {}: added or edited without the master key, so the server treats {} as absent (not served, no access granted). \
         Restore the database from a backup taken before the edit, and find out who could write it{}",
        bad.len(),
        if bad.len() == 1 { "" } else { "s" },
        database.display(),
        if bad.len() == 1 { "it" } else { "them" },
        set_text.map(|t| format!(". Also: {t}")).unwrap_or_default()
    )
}
