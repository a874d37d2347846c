//! `secretfs audit`: the log, filtered, once or followed.

use std::time::Duration;

use anyhow::Result;
use secretfs_proto::v1;
use serde_json::{json, Value};

use crate::args::{AuditArgs, AuditSub, ConnArgs, Format, Outcome};
use crate::connect;
use crate::output::{print, printable, time_ms, Table};

/// How often `--follow` asks for new events: a query costs the server one
/// indexed read, and an operator watching a terminal needs no more.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);

const HEADERS: [&str; 7] = [
    "TIME", "ACTOR", "ACTION", "RESULT", "TARGET", "VERSION", "DETAIL",
];

fn event_json(e: &v1::AuditEvent) -> Value {
    let none_if_empty = |s: &str| if s.is_empty() { Value::Null } else { json!(s) };
    json!({
        "id": e.id, "at": time_ms(e.at_ms), "at_ms": e.at_ms, "actor": e.actor, "action": e.action,
        "secret": none_if_empty(&e.secret), "client": none_if_empty(&e.client),
        "group": none_if_empty(&e.group),
        "version": if e.version == 0 { Value::Null } else { json!(e.version) },
        "allowed": e.allowed, "detail": e.detail,
    })
}

fn event_cells(e: &v1::AuditEvent) -> Vec<String> {
    let target = [
        (!e.secret.is_empty()).then(|| format!("secret={}", e.secret)),
        (!e.client.is_empty()).then(|| format!("client={}", e.client)),
        (!e.group.is_empty()).then(|| format!("group={}", e.group)),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(" ");
    vec![
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
    ]
}

/// `audit verify`: the server walks the chain; exit 1 at a break.
async fn verify(conn: &ConnArgs, format: Format) -> Result<()> {
    let mut c = connect::admin(conn).await?;
    let r = c
        .verify_audit(v1::VerifyAuditRequest {})
        .await?
        .into_inner();
    let brk = r.first_break.as_ref();
    let json = json!({
        "whole": brk.is_none(),
        "checked": r.checked,
        "last_id": r.last_id,
        "head": {"id": r.head_id, "chain": r.head_chain},
        "break": brk.map(|b| json!({"kind": b.kind, "id": b.id, "detail": b.detail})),
        "sink": if r.sink.is_empty() { Value::Null } else { json!({"name": r.sink, "last_id": r.sink_last_id}) },
    });
    let mut rows = vec![
        (
            "chain",
            match brk {
                None => "whole".into(),
                Some(b) => format!("BROKEN at entry {} ({})", b.id, b.kind),
            },
        ),
        ("entries checked", r.checked.to_string()),
        ("last entry", r.last_id.to_string()),
        (
            "head",
            format!("entry {} chain {}", r.head_id, r.head_chain),
        ),
    ];
    if !r.sink.is_empty() {
        rows.push((
            "sink",
            format!("{} (last entry {})", r.sink, r.sink_last_id),
        ));
    }
    let t = Table::vertical(rows);
    print(format, &json, t);
    match brk {
        None => Ok(()),
        Some(b) => Err(anyhow::anyhow!(
            "the audit chain is broken at entry {} ({}): {}",
            b.id,
            b.kind,
            printable(&b.detail)
        )),
    }
}

pub async fn run(conn: &ConnArgs, a: AuditArgs, format: Format) -> Result<()> {
    if let Some(AuditSub::Verify) = a.command {
        return verify(conn, format).await;
    }
    let mut c = connect::admin(conn).await?;
    let mut query = v1::AuditQuery {
        client: a.client.unwrap_or_default(),
        secret: a.secret.unwrap_or_default(),
        since: a.since.unwrap_or(0),
        limit: a.limit,
        action: a.action.unwrap_or_default(),
        allowed: a.outcome.map(|o| o == Outcome::Allowed),
        after_id: 0,
    };
    let events = c.query_audit(query.clone()).await?.into_inner().events;
    if !a.follow {
        let json = Value::Array(events.iter().map(event_json).collect());
        let mut t = Table::new(&HEADERS).empty("no audit events");
        for e in &events {
            t.row(event_cells(e));
        }
        print(format, &json, t);
        return Ok(());
    }
    // Following: one line per event (JSON Lines with -o json), so each
    // shows as it comes; no column alignment, since later rows are unknown.
    if format == Format::Text {
        println!("{}", HEADERS.join("  "));
    }
    // Listened for from here on, once: a Ctrl-C that comes while a query
    // is out (a listener made anew each pass would miss it, and the
    // default action is gone once one was made) still ends the follow.
    let stop = super::shutdown_signal()?;
    tokio::pin!(stop);
    let mut last = 0;
    let mut batch = events;
    loop {
        for e in &batch {
            match format {
                Format::Json => println!("{}", event_json(e)),
                Format::Text => println!(
                    "{}",
                    event_cells(e)
                        .iter()
                        .map(|c| printable(c).into_owned())
                        .collect::<Vec<_>>()
                        .join("  ")
                ),
            }
            last = last.max(e.id);
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = &mut stop => return Ok(()),
        }
        // After the cursor: everything new, oldest first, whatever
        // `--since` said (the cursor is later anyway).
        query.after_id = last;
        let reply = tokio::select! {
            reply = c.query_audit(query.clone()) => reply,
            _ = &mut stop => return Ok(()),
        };
        batch = match reply {
            Ok(reply) => reply.into_inner().events,
            // A server restarting is waited for; anything else ends it.
            Err(status) if status.code() == tonic::Code::Unavailable => {
                eprintln!(
                    "warning: the server is unavailable ({}); still following",
                    printable(status.message())
                );
                Vec::new()
            }
            Err(status) => return Err(status.into()),
        };
    }
}
