//! `secretfs access`, `whoami`, `read` and `audit`.

use std::io::Write;

use anyhow::{Context, Result};
use secretfs_proto::v1;
use serde_json::{json, Value};
use zeroize::Zeroize;

use crate::args::{AuditArgs, ConnArgs, Format};
use crate::connect;
use crate::output::{print, time, time_ms, Table};

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

pub async fn read(conn: &ConnArgs, name: &str) -> Result<()> {
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
            result = stdout
                .write_all(&s.content)
                .context("cannot write to stdout");
        }
        s.content.zeroize();
    }
    result?;
    stdout.flush().context("cannot write to stdout")
}

pub async fn audit(conn: &ConnArgs, a: AuditArgs, format: Format) -> Result<()> {
    let mut c = connect::admin(conn).await?;
    let reply = c
        .query_audit(v1::AuditQuery {
            client: a.client.unwrap_or_default(),
            secret: a.secret.unwrap_or_default(),
            since: a.since.unwrap_or(0),
            limit: a.limit,
        })
        .await?
        .into_inner();
    let none_if_empty = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    let json = Value::Array(
        reply
            .events
            .iter()
            .map(|e| {
                json!({
                    "id": e.id, "at": time_ms(e.at_ms), "at_ms": e.at_ms, "actor": e.actor, "action": e.action,
                    "secret": none_if_empty(&e.secret), "client": none_if_empty(&e.client),
                    "group": none_if_empty(&e.group),
                    "version": if e.version == 0 { Value::Null } else { json!(e.version) },
                    "allowed": e.allowed, "detail": e.detail,
                })
            })
            .collect(),
    );
    let mut t = Table::new(&[
        "TIME", "ACTOR", "ACTION", "RESULT", "TARGET", "VERSION", "DETAIL",
    ])
    .empty("no audit events");
    for e in &reply.events {
        let target = [
            (!e.secret.is_empty()).then(|| format!("secret={}", e.secret)),
            (!e.client.is_empty()).then(|| format!("client={}", e.client)),
            (!e.group.is_empty()).then(|| format!("group={}", e.group)),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
        t.row(vec![
            time_ms(e.at_ms),
            e.actor.clone(),
            e.action.clone(),
            if e.allowed {
                "allowed".into()
            } else {
                "DENIED".into()
            },
            target,
            if e.version == 0 {
                String::new()
            } else {
                e.version.to_string()
            },
            e.detail.clone(),
        ]);
    }
    print(format, &json, t);
    Ok(())
}
