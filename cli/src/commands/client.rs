//! `secretfs client …`

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use secretfs_proto::v1;
// One implementation of "create, never overwrite, with this mode, synced".
use secretfs_server::state_dir::write_new;
use serde_json::{json, Value};

use crate::args::{ClientAddArgs, ClientCmd, ConnArgs, Format};
use crate::fail::UsageError;
use crate::output::{print, time, Table};
use crate::{confirm, connect};

fn client_json(c: &v1::ClientInfo) -> Value {
    json!({
        "name": c.name, "admin": c.admin, "enabled": c.enabled,
        "created_at": time(c.created_at),
        "cert_serial": if c.cert_serial.is_empty() { Value::Null } else { json!(c.cert_serial) },
        "cert_not_after": if c.cert_not_after == 0 { Value::Null } else { json!(time(c.cert_not_after)) },
        "groups": c.groups,
    })
}

/// The files `client add` writes.
pub struct ClientFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl ClientFiles {
    pub fn new(dir: &Path, name: &str) -> Self {
        ClientFiles {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
            ca: dir.join("ca.pem"),
        }
    }
}

/// Registers `name` with a key made here; writes its files into `out`.
pub async fn add(
    conn: &ConnArgs,
    a: &ClientAddArgs,
) -> Result<(v1::ClientInfo, Option<ClientFiles>)> {
    secretfs_server::names::check_entity_name("client", &a.name)
        .map_err(|e| UsageError(e.to_string()))?;
    let files = ClientFiles::new(&a.out, &a.name);
    let (key_pem, csr_pem) = if a.external {
        (None, String::new())
    } else if let Some(csr) = &a.csr {
        let csr = std::fs::read_to_string(csr)
            .with_context(|| format!("cannot read the CSR {}", csr.display()))?;
        (None, csr)
    } else {
        let (key, csr) = secretfs_server::pki::new_csr(&a.name)?;
        (Some(key), csr)
    };
    if !a.external {
        for p in [&files.cert, &files.key] {
            if p.exists() && (key_pem.is_some() || p == &files.cert) {
                bail!(
                    "{} already exists; refusing to overwrite it (pick another --out)",
                    p.display()
                );
            }
        }
    }
    let mut client = connect::admin(conn).await?;
    let reply = client
        .create_client(v1::CreateClientRequest {
            name: a.name.clone(),
            csr_pem,
            admin: a.admin,
            days: a.days.unwrap_or(0),
        })
        .await?
        .into_inner();
    let info = reply.client.unwrap_or_default();
    if a.external {
        return Ok((info, None));
    }
    let undo = format!(
        "the client was registered but its files could not be written; run `secretfs client remove {}` and try again",
        a.name
    );
    if !a.out.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&a.out)
            .with_context(|| format!("cannot create {}", a.out.display()))
            .context(undo.clone())?;
    }
    if let Some(key) = &key_pem {
        write_new(&files.key, key.as_bytes(), 0o600).context(undo.clone())?;
    }
    write_new(&files.cert, reply.cert_pem.as_bytes(), 0o644).context(undo.clone())?;
    match std::fs::read(&files.ca) {
        Ok(existing) if existing == reply.ca_pem.as_bytes() => {}
        Ok(_) => bail!(
            "{} exists and holds another CA; the new client's CA was not written (it is in the server's state directory as ca.pem)",
            files.ca.display()
        ),
        Err(_) => write_new(&files.ca, reply.ca_pem.as_bytes(), 0o644).context(undo)?,
    }
    Ok((info, Some(files)))
}

pub async fn run(conn: &ConnArgs, cmd: ClientCmd, format: Format) -> Result<()> {
    match cmd {
        ClientCmd::Add(a) => {
            let (info, files) = add(conn, &a).await?;
            let mut j = client_json(&info);
            if let Some(f) = &files {
                j["files"] =
                    json!({"cert": f.cert, "key": f.key.exists().then_some(&f.key), "ca": f.ca});
            }
            match format {
                Format::Json => println!("{}", serde_json::to_string_pretty(&j)?),
                Format::Text => {
                    println!(
                        "added client {}{}",
                        info.name,
                        if info.admin { " (admin)" } else { "" }
                    );
                    match &files {
                        Some(f) => {
                            println!("  certificate: {}", f.cert.display());
                            if f.key.exists() && a.csr.is_none() {
                                println!("  key:         {} (0600; it never left this machine)", f.key.display());
                            }
                            println!("  CA:          {}", f.ca.display());
                        }
                        None => println!("  its certificate comes from your own CA (trusted with `server run --client-ca`)"),
                    }
                }
            }
        }
        ClientCmd::List => {
            let mut client = connect::admin(conn).await?;
            let list = client.list_clients(v1::Empty {}).await?.into_inner();
            let json = Value::Array(list.clients.iter().map(client_json).collect());
            let mut t =
                Table::new(&["NAME", "ADMIN", "GROUPS", "CERT EXPIRES"]).empty("no clients");
            for c in &list.clients {
                t.row(vec![
                    c.name.clone(),
                    if c.admin { "yes".into() } else { "no".into() },
                    c.groups.join(","),
                    if c.cert_not_after == 0 {
                        "external".into()
                    } else {
                        time(c.cert_not_after)
                    },
                ]);
            }
            print(format, &json, t);
        }
        ClientCmd::Describe { name } => {
            let mut client = connect::admin(conn).await?;
            let c = client
                .describe_client(v1::ClientRef { name })
                .await?
                .into_inner();
            let t = Table::vertical(vec![
                ("name", c.name.clone()),
                ("admin", c.admin.to_string()),
                ("enabled", c.enabled.to_string()),
                ("groups", c.groups.join(", ")),
                ("created", time(c.created_at)),
                (
                    "certificate",
                    if c.cert_serial.is_empty() {
                        "external (your own CA)".into()
                    } else {
                        c.cert_serial.clone()
                    },
                ),
                ("expires", time(c.cert_not_after)),
            ]);
            print(format, &client_json(&c), t);
        }
        ClientCmd::Remove { name, yes } => {
            let mut client = connect::admin(conn).await?;
            if confirm::wanted(yes) {
                let c = client
                    .describe_client(v1::ClientRef { name: name.clone() })
                    .await?
                    .into_inner();
                confirm::ask(&format!(
                    "Remove client {name}{}, in {}{}? Its certificate stops working at once.",
                    if c.admin { " (an admin)" } else { "" },
                    confirm::count(c.groups.len(), "group"),
                    confirm::listed(&c.groups),
                ))?;
            }
            client
                .remove_client(v1::ClientRef { name: name.clone() })
                .await?;
            match format {
                Format::Json => println!("{}", json!({"removed": name})),
                Format::Text => println!("removed client {name}; its certificate no longer works"),
            }
        }
    }
    Ok(())
}
