//! The audit table, its hash chain, and the revision counter every change
//! bumps (as `sqlite/audit.rs`).
//!
//! Chaining: `insert` takes the head row's lock (first insert of a job),
//! gives the entry the next id after the head and keeps the entry as
//! inserted in the job (in this process: nothing in the database can touch
//! it); at the end of the job, in its transaction, `chain_pending` chains
//! exactly those entries after the head and moves the head. An entry found
//! after the head that this server did not write fails the write.

use postgres::error::SqlState;
use postgres::Row;

use super::commit::Tx;
use crate::keys::Keys;
use crate::store::audit_chain::{
    chain_value, AuditHead, AuditVerdict, ChainedEntry, Walker, GENESIS,
};
use crate::store::{now_ms, AuditEntry, AuditFilter, Change, Result, StoreError};

fn tampered(what: String) -> StoreError {
    StoreError::CommitFailed(format!(
        "{what}: the database was edited without the server; run `secretfs audit verify` \
         and restore the database from a backup"
    ))
}

pub(super) fn insert(tx: &mut Tx<'_>, e: &AuditEntry) -> Result<()> {
    let id = match tx.job.next_audit_id {
        Some(id) => id,
        None => {
            // The head's lock, held to commit: audit inserts of every
            // replica queue here, in one order after the revision's.
            let head =
                locked_head(tx)?.ok_or_else(|| tampered("the audit head row is missing".into()))?;
            let next = head.last_id + 1;
            tx.job.head = Some(head);
            next
        }
    };
    tx.job.next_audit_id = Some(id + 1);
    let at_ms = if e.at_ms == 0 { now_ms() } else { e.at_ms };
    let inserted = tx.try_exec(
        "INSERT INTO audit (id, at_ms, actor, action, secret, client, grp, version, allowed, detail)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        &[
            &(id as i64),
            &at_ms,
            &e.actor,
            &e.action,
            &e.secret,
            &e.client,
            &e.group,
            &e.version.map(|v| v as i64),
            &i64::from(e.allowed),
            &e.detail,
        ],
    )?;
    match inserted {
        Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            return Err(tampered(format!(
                "the audit log holds entries after its head (entry {}) that this server did not write",
                id - 1
            )))
        }
        other => drop(other?),
    }
    tx.job.audit.push(AuditEntry {
        id,
        at_ms,
        ..e.clone()
    });
    Ok(())
}

/// Chains the entries this write job inserted, after the head, and moves
/// the head; in the job's transaction.
pub(super) fn chain_pending(tx: &mut Tx<'_>, keys: &Keys) -> Result<()> {
    let inserted = std::mem::take(&mut tx.job.audit);
    if inserted.is_empty() {
        return Ok(());
    }
    // As read under its lock by the job's first insert.
    let head = tx
        .job
        .head
        .take()
        .ok_or_else(|| tampered("the audit head row is missing".into()))?;
    if !head.is_authentic(keys) {
        return Err(tampered("the audit head row's MAC does not match".into()));
    }
    // Every entry after the head, in one query: exactly the ones this job
    // inserted (the ids the server writes follow the head's), each as the
    // server wrote it (a row rewritten in between, by a trigger, fails the
    // job).
    let after = tx.query(
        "SELECT id, at_ms, actor, action, secret, client, grp, version, allowed, detail, \
         epoch, chain FROM audit WHERE id > $1 ORDER BY id LIMIT $2",
        &[&(head.last_id as i64), &(inserted.len() as i64 + 1)],
    )?;
    if after.len() != inserted.len() || inserted[0].id != head.last_id + 1 {
        return Err(tampered(format!(
            "the audit log holds entries after its head (entry {}) that this server did not write",
            head.last_id
        )));
    }
    let epoch = keys.current.epoch();
    let mut prev = head.chain;
    for (row, mine) in after.iter().zip(&inserted) {
        let e = entry(row)?;
        if e != *mine {
            return Err(tampered(format!(
                "audit entry {} was changed between its insert and its chaining (is there a \
                 trigger on the audit table?)",
                mine.id
            )));
        }
        let chain = chain_value(keys, &e, &prev);
        tx.exec(
            "UPDATE audit SET epoch = $1, chain = $2 WHERE id = $3",
            &[&i64::from(epoch), &chain, &(mine.id as i64)],
        )?;
        prev = chain;
    }
    let last = inserted.last().expect("not empty").id;
    put_head(tx, &AuditHead::sign(keys, last, prev))
}

/// The head of a new database: no entry, the genesis value.
pub(super) fn start(tx: &mut Tx<'_>, keys: &Keys) -> Result<()> {
    put_head(tx, &AuditHead::sign(keys, 0, GENESIS.to_vec()))
}

fn entry(r: &Row) -> Result<AuditEntry> {
    Ok(AuditEntry {
        id: r.try_get::<_, i64>(0)? as u64,
        at_ms: r.try_get(1)?,
        actor: r.try_get(2)?,
        action: r.try_get(3)?,
        secret: r.try_get(4)?,
        client: r.try_get(5)?,
        group: r.try_get(6)?,
        version: r.try_get::<_, Option<i64>>(7)?.map(|v| v as u64),
        allowed: r.try_get::<_, i64>(8)? != 0,
        detail: r.try_get(9)?,
    })
}

fn chained(r: &Row) -> Result<(AuditEntry, Option<u32>, Option<Vec<u8>>)> {
    Ok((
        entry(r)?,
        r.try_get::<_, Option<i64>>(10)?
            .map(|e| u32::try_from(e).unwrap_or(u32::MAX)),
        r.try_get(11)?,
    ))
}

pub(super) fn head(tx: &mut Tx<'_>) -> Result<Option<AuditHead>> {
    let row = tx.opt(
        "SELECT last_id, chain, epoch, mac FROM audit_head WHERE id = 1",
        &[],
    )?;
    head_of(row)
}

/// The head, locked until commit.
fn locked_head(tx: &mut Tx<'_>) -> Result<Option<AuditHead>> {
    let row = tx.opt(
        "SELECT last_id, chain, epoch, mac FROM audit_head WHERE id = 1 FOR UPDATE",
        &[],
    )?;
    head_of(row)
}

fn head_of(row: Option<postgres::Row>) -> Result<Option<AuditHead>> {
    row.map(|r| {
        Ok(AuditHead {
            last_id: r.try_get::<_, i64>(0)? as u64,
            chain: r.try_get(1)?,
            epoch: u32::try_from(r.try_get::<_, i64>(2)?).unwrap_or(u32::MAX),
            mac: r.try_get(3)?,
        })
    })
    .transpose()
}

fn put_head(tx: &mut Tx<'_>, h: &AuditHead) -> Result<()> {
    tx.exec(
        "INSERT INTO audit_head (id, last_id, chain, epoch, mac) VALUES (1, $1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET last_id = excluded.last_id, chain = excluded.chain,
             epoch = excluded.epoch, mac = excluded.mac",
        &[&(h.last_id as i64), &h.chain, &i64::from(h.epoch), &h.mac],
    )?;
    Ok(())
}

/// Walks the whole log in one read transaction, a row at a time.
pub(super) fn verify(tx: &mut Tx<'_>, keys: &Keys) -> Result<AuditVerdict> {
    let head = head(tx)?;
    let mut walker = Walker::new(keys, head);
    tx.each(
        "SELECT id, at_ms, actor, action, secret, client, grp, version, allowed, detail, \
         epoch, chain FROM audit ORDER BY id",
        &[],
        |row| {
            let id = row.try_get::<_, i64>(0)? as u64;
            // `allowed` is 0 or 1 as the server writes it; any other value
            // reads as `true` (the MAC holds) but escapes `--outcome allowed`.
            let allowed: i64 = row.try_get(8)?;
            let item = match chained(row) {
                _ if !matches!(allowed, 0 | 1) => Err((
                    id,
                    format!("its allowed column holds {allowed}, neither 0 nor 1"),
                )),
                Ok((entry, epoch, chain)) => Ok(ChainedEntry {
                    entry,
                    epoch,
                    chain,
                    prev: Vec::new(),
                }),
                Err(e) => Err((
                    id,
                    format!("a column holds a value of the wrong type ({e})"),
                )),
            };
            walker.push(item);
            Ok(!walker.done())
        },
    )?;
    Ok(walker.finish())
}

/// Entries after `after_id`, with the chain value before each.
pub(super) fn after(tx: &mut Tx<'_>, after_id: u64, limit: usize) -> Result<Vec<ChainedEntry>> {
    let after_id = i64::try_from(after_id).unwrap_or(i64::MAX);
    let mut prev: Vec<u8> = tx
        .opt(
            "SELECT chain FROM audit WHERE id <= $1 ORDER BY id DESC LIMIT 1",
            &[&after_id],
        )?
        .map(|r| r.try_get::<_, Option<Vec<u8>>>(0))
        .transpose()?
        .flatten()
        .unwrap_or_else(|| GENESIS.to_vec());
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let rows = tx.query(
        "SELECT id, at_ms, actor, action, secret, client, grp, version, allowed, detail, \
         epoch, chain FROM audit WHERE id > $1 ORDER BY id LIMIT $2",
        &[&after_id, &limit],
    )?;
    let mut out = Vec::new();
    for row in &rows {
        let (entry, epoch, chain) = chained(row)?;
        let next = chain.clone().unwrap_or_default();
        out.push(ChainedEntry {
            entry,
            epoch,
            chain,
            prev: std::mem::replace(&mut prev, next),
        });
    }
    Ok(out)
}

/// Audits a change in the caller's transaction, which took the revision it
/// commits at first thing (`Write::Change`), and notes the change to
/// announce at commit (`change` of the revision). Returns the revision.
pub(super) fn record_change(
    tx: &mut Tx<'_>,
    e: &AuditEntry,
    change: impl FnOnce(u64) -> Change,
) -> Result<u64> {
    insert(tx, e)?;
    let revision = tx
        .job
        .revision
        .ok_or_else(|| StoreError::Backend("a change outside a change's transaction".into()))?;
    tx.job.change = Some(change(revision));
    Ok(revision)
}

pub(super) fn revision(tx: &mut Tx<'_>) -> Result<u64> {
    Ok(tx
        .one("SELECT value FROM revision WHERE id = 1", &[])?
        .try_get::<_, i64>(0)? as u64)
}

pub(super) fn query(tx: &mut Tx<'_>, filter: &AuditFilter) -> Result<Vec<AuditEntry>> {
    let limit = i64::from(if filter.limit == 0 {
        1000
    } else {
        filter.limit.min(100_000)
    });
    // Newest `limit` events, returned oldest first; after a cursor, the
    // oldest `limit` after it. Two statements, so each walks the id index
    // in its own direction instead of sorting the whole log.
    macro_rules! events {
        ($after:literal, $order:literal) => {
            concat!(
                "SELECT * FROM (
                SELECT id, at_ms, actor, action, secret, client, grp, version, allowed, detail FROM audit
                 WHERE ($1::TEXT IS NULL OR actor = $1 OR client = $1)
                   AND ($2::TEXT IS NULL OR secret = $2)
                   AND ($3::BIGINT IS NULL OR at_ms >= $3)
                   AND ($5::TEXT IS NULL OR action = $5
                        OR ($6::TEXT IS NOT NULL AND substr(action, 1, length($6)) = $6))
                   AND ($7::BIGINT IS NULL OR allowed = $7)
                   AND ",
                $after,
                " ORDER BY id ",
                $order,
                " LIMIT $4) AS e ORDER BY id"
            )
        };
    }
    let sql = if filter.after_id.is_some() {
        events!("id > $8::BIGINT", "ASC")
    } else {
        events!("$8::BIGINT IS NULL", "DESC")
    };
    // `secret.*` matches every action starting `secret.`.
    let prefix = filter
        .action
        .as_deref()
        .and_then(|a| a.strip_suffix('*'))
        .filter(|p| p.ends_with('.'));
    let rows = tx.query(
        sql,
        &[
            &filter.client,
            &filter.secret,
            &filter.since_ms,
            &limit,
            &filter.action,
            &prefix,
            &filter.allowed.map(i64::from),
            &filter
                .after_id
                .map(|i| i64::try_from(i).unwrap_or(i64::MAX)),
        ],
    )?;
    rows.iter().map(entry).collect()
}
