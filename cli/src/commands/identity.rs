//! `secretfs access`, `whoami` and `read`.

use std::io::Write;

use anyhow::{Context, Result};
use secretfs_proto::v1;
use serde_json::{json, Value};
use zeroize::Zeroize;

use crate::args::{ConnArgs, Format};
use crate::connect;
use crate::output::{print, printable, time, Table};

fn access_table(entries: &[v1::AccessEntry]) -> (Value, Table) {
    let json = Value::Array(
        entries
            .iter()
            .map(|e| json!({"secret": e.secret, "groups": e.groups}))
            .collect(),
    );
    let mut t = Table::new(&["SECRET", "THROUGH GROUPS"]).empty("no secrets readable");
    for e in entries {
        t.row(vec![e.secret.clone(), e.groups.join(", ")]);
    }
    (json, t)
}

pub async fn access(conn: &ConnArgs, client: &str, format: Format) -> Result<()> {
    let mut c = connect::admin(conn).await?;
    let reply = c
        .client_access(v1::ClientRef {
            name: client.to_owned(),
        })
        .await?
        .into_inner();
    let (entries, table) = access_table(&reply.entries);
    print(
        format,
        &json!({"client": reply.client, "access": entries}),
        table,
    );
    Ok(())
}

pub async fn whoami(conn: &ConnArgs, format: Format) -> Result<()> {
    let mut c = connect::secrets(conn).await?;
    let me = c.who_am_i(v1::Empty {}).await?.into_inner();
    let (entries, table) = access_table(&me.access);
    match format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "client": me.client, "admin": me.admin, "trust_domain": me.trust_domain,
                "spiffe_id": format!("spiffe://{}/client/{}", me.trust_domain, me.client),
                "cert_serial": me.cert_serial,
                "cert_not_after": if me.cert_not_after == 0 { Value::Null } else { json!(time(me.cert_not_after)) },
                "access": entries,
            }))?
        ),
        Format::Text => {
            println!(
                "client {} (spiffe://{}/client/{}){}",
                me.client,
                me.trust_domain,
                me.client,
                if me.admin { ", admin" } else { "" }
            );
            if me.cert_not_after != 0 {
                println!(
                    "certificate {}, expires {}",
                    me.cert_serial,
                    time(me.cert_not_after)
                );
            }
            table.print();
        }
    }
    Ok(())
}

/// `secretfs read NAME`: the content's bytes on stdout, exactly; with
/// `-o json`, one JSON object with the name, version and content as text.
pub async fn read(conn: &ConnArgs, name: &str, format: Format) -> Result<()> {
    let mut c = connect::secrets(conn).await?;
    let reply = c
        .read_secrets(v1::ReadSecretsRequest {
            names: vec![name.to_owned()],
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let mut result = Ok(());
    for mut s in reply.secrets {
        if result.is_ok() {
            result = match format {
                Format::Text => stdout
                    .write_all(&s.content)
                    .context("cannot write to stdout"),
                Format::Json => write_json(&mut stdout, &s),
            };
        }
        s.content.zeroize();
    }
    result?;
    stdout.flush().context("cannot write to stdout")
}

#[derive(serde::Serialize)]
struct ReadJson<'a> {
    name: &'a str,
    version: u64,
    content: &'a str,
}

/// One secret as `{"name","version","content"}` and a newline. JSON has no
/// bytes type, so content that is not UTF-8 is refused, not mangled. The
/// buffer holds the content, so it is sized for the worst case up front
/// (no reallocation leaves a copy behind) and wiped when dropped.
fn write_json(out: &mut impl Write, s: &v1::SecretContent) -> Result<()> {
    let meta = s.meta.clone().unwrap_or_default();
    let content = std::str::from_utf8(&s.content).map_err(|_| {
        anyhow::anyhow!(
            "{} is not UTF-8 text, which JSON cannot carry; \
             read it without -o json to get its bytes on stdout",
            printable(&meta.name)
        )
    })?;
    // serde_json escapes a byte as at most 6 (\u00XX).
    let capacity = 6 * (content.len() + meta.name.len()) + 64;
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(capacity));
    serde_json::to_writer(
        &mut *buf,
        &ReadJson {
            name: &meta.name,
            version: meta.current_version,
            content,
        },
    )?;
    buf.push(b'\n');
    out.write_all(&buf).context("cannot write to stdout")
}
