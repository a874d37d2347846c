//! `secretfs server init|run`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use secretfs_server::{InitOptions, RunOptions, Server, StateDir};
use serde_json::json;

use crate::args::{Format, ServerCmd, ServerSub};

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

/// Writes `--address-file`: a new temporary sibling (created exclusively,
/// so a planted file or symlink is never followed) renamed into place, so
/// a reader sees the whole file or none. It holds no secret (mode 0644).
fn write_address_file(path: &Path, addr: SocketAddr, health: Option<SocketAddr>) -> Result<()> {
    let text = serde_json::to_string(&json!({
        "addr": addr.to_string(),
        "health_addr": health.map(|a| a.to_string()),
    }))?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let created =
        secretfs_server::state_dir::write_new(&tmp, format!("{text}\n").as_bytes(), 0o644);
    let written = match created {
        Ok(()) => std::fs::rename(&tmp, path).inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        }),
        Err(e) => Err(std::io::Error::other(e)),
    };
    written.with_context(|| {
        format!(
            "cannot write the address file {} (--address-file); check that its directory exists and is writable",
            path.display()
        )
    })
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
        ServerSub::Run(a) => {
            let server = Server::open(RunOptions {
                state_dir: a.state_dir,
                listen: a.listen,
                max_secret_size: a.max_secret_size,
                client_ca: a.client_ca,
                health_listen: a.health_listen,
                max_connections: a.max_connections,
            })
            .await
            .context("the server did not start")?;
            if let Some(path) = &a.address_file {
                write_address_file(path, server.local_addr(), server.health_addr())?;
            }
            server.serve(super::shutdown_signal()).await?;
            Ok(())
        }
    }
}
