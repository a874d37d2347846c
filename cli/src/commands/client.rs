//! `secretfs client …`

use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use secretfs_proto::v1;
// One implementation of "create, never overwrite, with this mode, synced".
use secretfs_proto::files::ClientPaths;
use secretfs_server::state_dir::write_new;
use serde_json::{json, Value};

use crate::args::{ClientAddArgs, ClientCmd, ClientRenewArgs, ConnArgs, Format};
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

/// Registers `name` with a key made here; writes its files into `out`.
pub async fn add(
    conn: &ConnArgs,
    a: &ClientAddArgs,
) -> Result<(v1::ClientInfo, Option<ClientPaths>)> {
    secretfs_server::names::check_entity_name("client", &a.name)
        .map_err(|e| UsageError(e.to_string()))?;
    let files = ClientPaths::in_dir(&a.out, &a.name);
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
        // The key file matters only when a key is made here.
        let key_file = files.key.as_ref().filter(|_| key_pem.is_some());
        for p in std::iter::once(&files.cert).chain(key_file) {
            if p.exists() {
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
    if let (Some(key), Some(path)) = (&key_pem, &files.key) {
        write_new(path, key.as_bytes(), 0o600).context(undo.clone())?;
    }
    write_new(&files.cert, reply.cert_pem.as_bytes(), 0o644).context(undo.clone())?;
    if let Some(ca) = &files.ca {
        match std::fs::read(ca) {
            Ok(existing) if existing == reply.ca_pem.as_bytes() => {}
            Ok(_) => bail!(
                "{} exists and holds another CA; the new client's CA was not written (it is in the server's state directory as ca.pem)",
                ca.display()
            ),
            Err(_) => write_new(ca, reply.ca_pem.as_bytes(), 0o644).context(undo)?,
        }
    }
    Ok((info, Some(files)))
}

pub async fn run(conn: &ConnArgs, cmd: ClientCmd, format: Format) -> Result<()> {
    match cmd {
        ClientCmd::Add(a) => {
            let (info, files) = add(conn, &a).await?;
            let mut j = client_json(&info);
            if let Some(f) = &files {
                j["files"] = json!({"cert": f.cert, "key": f.key.as_ref().filter(|k| k.exists()), "ca": f.ca});
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
                            if let Some(key) = f.key.as_ref().filter(|k| k.exists() && a.csr.is_none()) {
                                println!("  key:         {} (0600; it never left this machine)", key.display());
                            }
                            if let Some(ca) = &f.ca {
                                println!("  CA:          {}", ca.display());
                            }
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
        ClientCmd::Renew(a) => renew_cmd(conn, a, format).await?,
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

/// A certificate `client renew` issued and wrote.
struct Renewed {
    name: String,
    files: ClientPaths,
    serial: String,
    /// Unix seconds.
    not_after: i64,
}

/// `client renew [NAME]`: a new certificate for this identity or, as an
/// admin, for NAME.
async fn renew(conn: &ConnArgs, a: &ClientRenewArgs) -> Result<Renewed> {
    if let Some(name) = &a.name {
        secretfs_server::names::check_entity_name("client", name)
            .map_err(|e| UsageError(e.to_string()))?;
    }
    // clap refuses --days outside 1..=3650; 0 asks for the server's default.
    let days = a.days.unwrap_or(0);
    let csr_given = match &a.csr {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the CSR {}", p.display()))?,
        ),
        None => None,
    };
    // For oneself, the name is the one the server sees (also proves the
    // current certificate still works before anything is made). The same
    // connection asks for the new certificate: one read and check of the
    // files, one handshake, one expiry warning.
    let mut own = None;
    let name = match &a.name {
        Some(n) => n.clone(),
        None => {
            let s = own.insert(connect::secrets(conn).await?);
            s.who_am_i(v1::Empty {}).await?.into_inner().client
        }
    };
    let files = match (&a.out, &a.name, &csr_given) {
        (None, None, None) => ClientPaths {
            cert: conn.cert.clone().context("no --cert to renew")?,
            key: Some(conn.key.clone().context("no --key to renew")?),
            ca: None,
        },
        (out, _, _) => {
            let dir = out.as_deref().unwrap_or(Path::new("."));
            let f = ClientPaths::in_dir(dir, &name);
            ClientPaths {
                key: f.key.filter(|_| csr_given.is_none()),
                ..f
            }
        }
    };
    let (key_pem, csr_pem) = match csr_given {
        Some(csr) => (None, csr),
        None => {
            let (key, csr) = secretfs_server::pki::new_csr(&name)?;
            (Some(key), csr)
        }
    };
    // The replies say the serial and end, so the new PEM is not parsed.
    let (cert_pem, ca_pem, serial, not_after) = match own {
        Some(mut s) => {
            let r = s
                .renew_certificate(v1::RenewCertificateRequest { csr_pem, days })
                .await?
                .into_inner();
            (r.cert_pem, r.ca_pem, r.serial, r.not_after)
        }
        None => {
            let mut c = connect::admin(conn).await?;
            let r = c
                .renew_client_certificate(v1::RenewClientCertificateRequest {
                    name: name.clone(),
                    csr_pem,
                    days,
                })
                .await?
                .into_inner();
            let client = r.client.unwrap_or_default();
            (
                r.cert_pem,
                r.ca_pem,
                client.cert_serial,
                client.cert_not_after,
            )
        }
    };
    // The key and certificate are replaced together: both written first,
    // then renamed back to back, the old key put back if the certificate
    // cannot be (secretfs_proto::files).
    let key = key_pem.as_ref().map(|k| k.as_bytes());
    if let Err(e) = secretfs_proto::files::write_client_files(
        &files,
        cert_pem.as_bytes(),
        key,
        ca_pem.as_bytes(),
    ) {
        if e.unchanged() {
            bail!(
                "the new certificate was issued but could not be written: {e}; your files are as they were and the \
                 old certificate still works: fix that and run `secretfs client renew` again"
            );
        }
        bail!(
            "the new certificate was issued but could not be written: {e}. Until the files are fixed they do not \
             work together: move the new certificate over {} (or the old key back over {}); or have an admin \
             run `secretfs client renew {name}`",
            files.cert.display(),
            files.key.as_deref().unwrap_or(Path::new("the key")).display()
        );
    }
    Ok(Renewed {
        name,
        files,
        serial,
        not_after,
    })
}

async fn renew_cmd(conn: &ConnArgs, a: ClientRenewArgs, format: Format) -> Result<()> {
    let Renewed {
        name,
        files,
        serial,
        not_after,
    } = renew(conn, &a).await?;
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "name": name, "cert_serial": serial, "cert_not_after": time(not_after),
                "files": {"cert": files.cert, "key": files.key, "ca": files.ca},
            }))?
        ),
        Format::Text => {
            println!(
                "issued client {name} a new certificate, valid until {}",
                time(not_after)
            );
            println!("  certificate: {}", files.cert.display());
            if let Some(k) = &files.key {
                println!(
                    "  key:         {} (0600; new, it never left this machine)",
                    k.display()
                );
            }
            if let Some(ca) = &files.ca {
                println!("  CA:          {}", ca.display());
            }
            println!("  the previous certificate stays valid until it expires");
        }
    }
    Ok(())
}
