//! The audit table, its hash chain, and the revision counter every change
//! bumps (as `sqlite/audit.rs`).
//!
//! Chaining: a job holds the head row's lock (taken with a change's first
//! statements, at an audit-only job's first insert, or kept from an earlier
//! job of the same transaction); `insert` gives the entry the next id after
//! the head and its chain value, and the row must come back as written; at
//! the end of the batch, in its transaction, `close` writes the moved head.
//! An entry found at an id after the head that this server did not write
//! fails the write (the batch, when found at its end).

use postgres::error::SqlState;
use postgres::Row;

use super::commit::{owned, Owned, Tx};
use super::session::{Answer, Want};
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

/// Takes the head's lock in the job's next round trip, unless the job
/// holds it already (see `Job::head`).
pub(super) fn lock_head(tx: &mut Tx<'_>) -> Result<()> {
    if tx.job.head.is_some() {
        return Ok(());
    }
    tx.later(LOCKED_HEAD, Want::Rows, owned![], |job, answer| {
        let rows = answer?.into_rows();
        job.head = head_of(rows.into_iter().next())?;
        job.head_unchecked = true;
        Ok(())
    })
}

/// The head as the job holds it (its lock taken), its MAC checked.
fn held_head<'t>(tx: &'t mut Tx<'_>, keys: &Keys) -> Result<&'t mut AuditHead> {
    if tx.job.head.is_none() {
        // The head's lock, held to commit: audit inserts of every replica
        // queue here, in one order after the revision's.
        tx.job.head = head_of(tx.opt(LOCKED_HEAD, &[])?)?;
        tx.job.head_unchecked = true;
    }
    let head = tx
        .job
        .head
        .as_mut()
        .ok_or_else(|| tampered("the audit head row is missing".into()))?;
    if std::mem::take(&mut tx.job.head_unchecked) && !head.is_authentic(keys) {
        return Err(tampered("the audit head row's MAC does not match".into()));
    }
    Ok(head)
}

/// Appends `e` to the log, chained after the head (the head moves in the
/// job; [`close`] writes it at the batch's end). The insert is sent with the job's next
/// round trip; it fails the job if an entry already has its id (one the
/// server did not write), or if the row comes back other than written (a
/// trigger on the audit table).
pub(super) fn insert(tx: &mut Tx<'_>, e: &AuditEntry) -> Result<()> {
    let keys = tx
        .keys
        .ok_or_else(|| StoreError::Backend("an audit entry outside a write job".into()))?;
    let head = held_head(tx, keys)?;
    let at_ms = if e.at_ms == 0 { now_ms() } else { e.at_ms };
    let mine = AuditEntry {
        id: head.last_id + 1,
        at_ms,
        ..e.clone()
    };
    let epoch = keys.current.epoch();
    let chain = chain_value(keys, &mine, &head.chain);
    head.last_id = mine.id;
    head.chain = chain.clone();
    tx.job.head_moved = true;
    let after = mine.id - 1;
    tx.later(
        "INSERT INTO audit (id, at_ms, actor, action, secret, client, grp, version, allowed, detail, epoch, chain)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         RETURNING id, at_ms, actor, action, secret, client, grp, version, allowed, detail, epoch, chain",
        Want::Rows,
        owned![
            mine.id as i64,
            at_ms,
            mine.actor.clone(),
            mine.action.clone(),
            mine.secret.clone(),
            mine.client.clone(),
            mine.group.clone(),
            mine.version.map(|v| v as i64),
            i64::from(mine.allowed),
            mine.detail.clone(),
            i64::from(epoch),
            chain.clone(),
        ],
        move |_, answer| {
            let rows = match answer {
                Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                    return Err(tampered(format!(
                        "the audit log holds entries after its head (entry {after}) that this \
                         server did not write"
                    )))
                }
                Err(err) => return Err(err.into()),
                Ok(answer) => answer.into_rows(),
            };
            let as_written = match rows.first().map(chained).transpose()? {
                Some((entry, Some(e), Some(c))) => entry == mine && e == epoch && c == chain,
                _ => false,
            };
            if !as_written {
                return Err(tampered(format!(
                    "audit entry {} came back from the database other than the server wrote it \
                     (is there a trigger on the audit table?)",
                    mine.id
                )));
            }
            Ok(())
        },
    )
}

/// At the end of a batch whose jobs inserted entries: no entry follows
/// theirs, and the head they moved is written.
pub(super) fn close(tx: &mut Tx<'_>, keys: &Keys, head: &AuditHead) -> Result<()> {
    let head = AuditHead::sign(keys, head.last_id, head.chain.clone());
    // Nothing after the last entry either (a forged entry at a later id
    // would be adopted by the writes that reach it).
    let last = head.last_id;
    tx.later(
        "SELECT id FROM audit WHERE id > $1 ORDER BY id LIMIT 1",
        Want::Rows,
        owned![last as i64],
        move |_, answer| match answer? {
            Answer::Rows(rows) if !rows.is_empty() => Err(tampered(format!(
                "the audit log holds entries after its head (entry {last}) that this server \
                 did not write"
            ))),
            _ => Ok(()),
        },
    )?;
    tx.later_exec(PUT_HEAD, put_head_params(&head))
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
const LOCKED_HEAD: &str =
    "SELECT last_id, chain, epoch, mac FROM audit_head WHERE id = 1 FOR UPDATE";

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

const PUT_HEAD: &str =
    "INSERT INTO audit_head (id, last_id, chain, epoch, mac) VALUES (1, $1, $2, $3, $4)
     ON CONFLICT (id) DO UPDATE SET last_id = excluded.last_id, chain = excluded.chain,
         epoch = excluded.epoch, mac = excluded.mac";

fn put_head_params(h: &AuditHead) -> Owned {
    owned![
        h.last_id as i64,
        h.chain.clone(),
        i64::from(h.epoch),
        h.mac.clone()
    ]
}

fn put_head(tx: &mut Tx<'_>, h: &AuditHead) -> Result<()> {
    tx.later_exec(PUT_HEAD, put_head_params(h))
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
