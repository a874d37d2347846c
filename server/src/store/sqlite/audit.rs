//! The audit table and the revision counter every change bumps.

use rusqlite::{params, Connection};

use crate::store::{now_ms, AuditEntry, AuditFilter, Result};

pub(super) fn insert(tx: &Connection, e: &AuditEntry) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit (at_ms, actor, action, secret, client, grp, version, allowed, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        if e.at_ms == 0 { now_ms() } else { e.at_ms },
        e.actor,
        e.action,
        e.secret,
        e.client,
        e.group,
        e.version.map(|v| v as i64),
        e.allowed,
        e.detail
    ])?;
    Ok(())
}

/// Audits a change and bumps the revision, in the caller's transaction;
/// returns the revision the change commits at.
pub(super) fn record_change(tx: &Connection, e: &AuditEntry) -> Result<u64> {
    insert(tx, e)?;
    let revision: i64 = tx
        .prepare_cached("UPDATE revision SET value = value + 1 WHERE id = 1 RETURNING value")?
        .query_row([], |r| r.get(0))?;
    Ok(revision as u64)
}

pub(super) fn revision(tx: &Connection) -> Result<u64> {
    Ok(tx
        .prepare_cached("SELECT value FROM revision WHERE id = 1")?
        .query_row([], |r| r.get::<_, i64>(0))? as u64)
}

pub(super) fn query(tx: &Connection, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
    let limit = if filter.limit == 0 {
        1000
    } else {
        filter.limit.min(100_000)
    };
    // Newest `limit` events, returned oldest first; after a cursor, the
    // oldest `limit` after it. Two statements, so each walks the id index
    // in its own direction instead of sorting the whole log.
    macro_rules! events {
        ($after:literal, $order:literal) => {
            concat!(
                "SELECT * FROM (
                SELECT id, at_ms, actor, action, secret, client, grp, version, allowed, detail FROM audit
                 WHERE (?1 IS NULL OR actor = ?1 OR client = ?1)
                   AND (?2 IS NULL OR secret = ?2)
                   AND (?3 IS NULL OR at_ms >= ?3)
                   AND (?5 IS NULL OR action = ?5
                        OR (?6 IS NOT NULL AND substr(action, 1, length(?6)) = ?6))
                   AND (?7 IS NULL OR allowed = ?7)
                   AND ",
                $after,
                " ORDER BY id ",
                $order,
                " LIMIT ?4) ORDER BY id"
            )
        };
    }
    let mut stmt = if filter.after_id.is_some() {
        tx.prepare_cached(events!("id > ?8", "ASC"))?
    } else {
        tx.prepare_cached(events!("?8 IS NULL", "DESC"))?
    };
    // `secret.*` matches every action starting `secret.`.
    let prefix = filter
        .action
        .as_deref()
        .and_then(|a| a.strip_suffix('*'))
        .filter(|p| p.ends_with('.'));
    let rows = stmt.query_map(
        params![
            filter.client,
            filter.secret,
            filter.since_ms,
            limit,
            filter.action,
            prefix,
            filter.allowed,
            filter
                .after_id
                .map(|i| i64::try_from(i).unwrap_or(i64::MAX))
        ],
        |r| {
            Ok(AuditEntry {
                id: r.get::<_, i64>(0)? as u64,
                at_ms: r.get(1)?,
                actor: r.get(2)?,
                action: r.get(3)?,
                secret: r.get(4)?,
                client: r.get(5)?,
                group: r.get(6)?,
                version: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
                allowed: r.get(8)?,
                detail: r.get(9)?,
            })
        },
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}
