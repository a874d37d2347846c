//! The audit table, its hash chain, and the revision counter every change
//! bumps.
//!
//! Chaining: `insert` writes an entry and notes its id in the writer
//! connection's temporary table `audit_pending`; at the end of every write
//! job, in the same transaction, `chain_pending` chains exactly those
//! entries after the head row and moves the head (see
//! [`crate::store::audit_chain`]). Entries are never chained because they
//! merely lack a chain value: one found after the head that this server did
//! not write fails the write instead of being adopted.

use rusqlite::{params, Connection, OptionalExtension};

use crate::keys::Keys;
use crate::store::audit_chain::{
    chain_value, AuditHead, AuditVerdict, ChainedEntry, Walker, GENESIS,
};
use crate::store::{now_ms, AuditEntry, AuditFilter, Result, StoreError};

/// Makes the writer connection's list of entries to chain (per connection,
/// never in the database file).
pub(super) fn setup_writer(conn: &Connection) -> Result<()> {
    // The entry as the server inserted it is kept here too: a trigger in
    // the database file could rewrite the row before it is chained, and
    // nothing in the file can touch a TEMP table.
    conn.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS audit_pending (
           id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, actor TEXT NOT NULL,
           action TEXT NOT NULL, secret TEXT, client TEXT, grp TEXT, version INTEGER,
           allowed INTEGER NOT NULL, detail TEXT NOT NULL)",
    )?;
    Ok(())
}

pub(super) fn insert(tx: &Connection, e: &AuditEntry) -> Result<()> {
    let at_ms = if e.at_ms == 0 { now_ms() } else { e.at_ms };
    let id: i64 = tx.prepare_cached(
        "INSERT INTO audit (at_ms, actor, action, secret, client, grp, version, allowed, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING id",
    )?
    .query_row(params![
        at_ms,
        e.actor,
        e.action,
        e.secret,
        e.client,
        e.group,
        e.version.map(|v| v as i64),
        e.allowed,
        e.detail
    ], |r| r.get(0))?;
    tx.prepare_cached(
        "INSERT INTO temp.audit_pending
           (id, at_ms, actor, action, secret, client, grp, version, allowed, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        id,
        at_ms,
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

fn tampered(what: String) -> StoreError {
    StoreError::CommitFailed(format!(
        "{what}: the database was edited without the server; run `secretfs audit verify` \
         and restore the database from a backup"
    ))
}

/// Chains the entries this write job inserted, after the head, and moves
/// the head; in the job's transaction.
pub(super) fn chain_pending(tx: &Connection, keys: &Keys) -> Result<()> {
    let inserted: Vec<AuditEntry> = tx
        .prepare_cached(
            "SELECT id, at_ms, actor, action, secret, client, grp, version, allowed, detail
             FROM temp.audit_pending ORDER BY id",
        )?
        .query_map([], entry)?
        .collect::<Result<_, _>>()?;
    let ids: Vec<i64> = inserted.iter().map(|e| e.id as i64).collect();
    if ids.is_empty() {
        return Ok(());
    }
    tx.prepare_cached("DELETE FROM temp.audit_pending")?
        .execute([])?;
    let head = head(tx)?.ok_or_else(|| tampered("the audit head row is missing".into()))?;
    if !head.is_authentic(keys) {
        return Err(tampered("the audit head row's MAC does not match".into()));
    }
    let after: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM audit WHERE id > ?1")?
        .query_row([head.last_id as i64], |r| r.get(0))?;
    // The ids the server writes are contiguous: the first after the head
    // is the head's plus one (a gap is an entry deleted without the key).
    let contiguous = ids.windows(2).all(|w| w[1] == w[0] + 1);
    if after as usize != ids.len() || ids[0] != head.last_id as i64 + 1 || !contiguous {
        return Err(tampered(format!(
            "the audit log holds entries after its head (entry {}) that this server did not write",
            head.last_id
        )));
    }
    let epoch = keys.current.epoch();
    let mut prev = head.chain;
    let mut load = tx.prepare_cached(&format!("{SELECT} WHERE id = ?1"))?;
    let mut store = tx.prepare_cached("UPDATE audit SET epoch = ?1, chain = ?2 WHERE id = ?3")?;
    for (id, mine) in ids.iter().zip(&inserted) {
        let e = load.query_row([id], entry)?;
        // Chained only as the server wrote it: a row rewritten in between
        // (a trigger in the file) fails the job.
        if e != *mine {
            return Err(tampered(format!(
                "audit entry {id} was changed between its insert and its chaining (is there a \
                 trigger in the database file?)"
            )));
        }
        let chain = chain_value(keys, &e, &prev);
        store.execute(params![epoch, chain, id])?;
        prev = chain;
    }
    put_head(
        tx,
        &AuditHead::sign(keys, *ids.last().expect("not empty") as u64, prev),
    )
}

/// Chains every entry of a database made before chaining, from the
/// genesis, and writes the head. Run once, in the transaction of the
/// migration that added the chain, under the verified master key.
pub(super) fn adopt(tx: &Connection, keys: &Keys) -> Result<()> {
    let epoch = keys.current.epoch();
    let mut prev = GENESIS.to_vec();
    let mut last = 0u64;
    let mut update = tx.prepare("UPDATE audit SET epoch = ?1, chain = ?2 WHERE id = ?3")?;
    let mut select = tx.prepare(&format!("{SELECT} ORDER BY id"))?;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let e = entry(row)?;
        let chain = chain_value(keys, &e, &prev);
        update.execute(params![epoch, chain, e.id as i64])?;
        last = e.id;
        prev = chain;
    }
    put_head(tx, &AuditHead::sign(keys, last, prev))
}

const SELECT: &str =
    "SELECT id, at_ms, actor, action, secret, client, grp, version, allowed, detail, epoch, chain FROM audit";

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
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
}

fn chained(r: &rusqlite::Row<'_>) -> rusqlite::Result<(AuditEntry, Option<u32>, Option<Vec<u8>>)> {
    Ok((
        entry(r)?,
        r.get::<_, Option<i64>>(10)?
            .map(|e| u32::try_from(e).unwrap_or(u32::MAX)),
        r.get(11)?,
    ))
}

pub(super) fn head(tx: &Connection) -> Result<Option<AuditHead>> {
    Ok(tx
        .prepare_cached("SELECT last_id, chain, epoch, mac FROM audit_head WHERE id = 1")?
        .query_row([], |r| {
            Ok(AuditHead {
                last_id: r.get::<_, i64>(0)? as u64,
                chain: r.get(1)?,
                epoch: u32::try_from(r.get::<_, i64>(2)?).unwrap_or(u32::MAX),
                mac: r.get(3)?,
            })
        })
        .optional()?)
}

fn put_head(tx: &Connection, h: &AuditHead) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO audit_head (id, last_id, chain, epoch, mac) VALUES (1, ?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET last_id = excluded.last_id, chain = excluded.chain,
             epoch = excluded.epoch, mac = excluded.mac",
    )?
    .execute(params![h.last_id as i64, h.chain, h.epoch, h.mac])?;
    Ok(())
}

/// Walks the whole log in one read transaction, a row at a time.
pub(super) fn verify(tx: &Connection, keys: &Keys) -> Result<AuditVerdict> {
    let mut walker = Walker::new(keys, head(tx)?);
    let mut select = tx.prepare(&format!("{SELECT} ORDER BY id"))?;
    let mut rows = select.query([])?;
    while let Some(row) = rows.next()? {
        let id = row.get::<_, i64>(0)? as u64;
        // `allowed` is 0 or 1 as the server writes it; any other value
        // reads as `true` (the MAC holds) but escapes `--outcome allowed`.
        let allowed = row.get_ref(8)?;
        let item = match chained(row) {
            _ if !matches!(allowed, rusqlite::types::ValueRef::Integer(0 | 1)) => Err((
                id,
                format!("its allowed column holds {allowed:?}, neither 0 nor 1"),
            )),
            // The walker keeps the previous chain value itself.
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
        if walker.done() {
            break;
        }
    }
    Ok(walker.finish())
}

/// Entries after `after_id`, with the chain value before each.
pub(super) fn after(tx: &Connection, after_id: u64, limit: usize) -> Result<Vec<ChainedEntry>> {
    let after_id = i64::try_from(after_id).unwrap_or(i64::MAX);
    let mut prev: Vec<u8> = tx
        .prepare_cached("SELECT chain FROM audit WHERE id <= ?1 ORDER BY id DESC LIMIT 1")?
        .query_row([after_id], |r| r.get::<_, Option<Vec<u8>>>(0))
        .optional()?
        .flatten()
        .unwrap_or_else(|| GENESIS.to_vec());
    let mut stmt = tx.prepare_cached(&format!("{SELECT} WHERE id > ?1 ORDER BY id LIMIT ?2"))?;
    let rows = stmt.query_map(params![after_id, limit as i64], chained)?;
    let mut out = Vec::new();
    for row in rows {
        let (entry, epoch, chain) = row?;
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
        entry,
    )?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::{migrate, SqliteStore};
    use crate::envelope::{KEY_CHECK, KEY_CHECK_PLAINTEXT};
    use crate::keys::KeyRing;
    use crate::store::audit_chain::BreakKind;
    use crate::store::{AuditEntry, Store};

    fn entry(actor: &str) -> AuditEntry {
        AuditEntry {
            actor: actor.into(),
            action: "secret.read".into(),
            allowed: true,
            ..Default::default()
        }
    }

    fn kind(s: &SqliteStore) -> Option<(BreakKind, u64)> {
        s.verify_audit().unwrap().broken.map(|b| (b.kind, b.id))
    }

    #[test]
    fn every_insert_is_chained_and_the_head_follows() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.append_audit(&[entry("a"), entry("b")]).unwrap();
        s.create_group("g", "", &entry("admin")).unwrap();
        s.append_audit(&[entry("c")]).unwrap();
        let v = s.verify_audit().unwrap();
        assert_eq!((v.checked, v.last_id, v.broken), (4, 4, None));
        assert_eq!(v.head.unwrap().0, 4);
        let rows = s.audit_after(0, 10).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[1].prev, rows[0].chain.clone().unwrap());
        assert_eq!(
            s.audit_after(2, 10).unwrap()[0].prev,
            rows[1].chain.clone().unwrap()
        );
        // A failed write chains nothing and leaves the chain whole.
        assert!(s.create_group("g", "", &entry("admin")).is_err());
        assert_eq!(kind(&s), None);

        // An edit is found, and so is a forged entry after the head; a
        // write then refuses to adopt the forgery.
        let w = || s.db.writer();
        w().execute("UPDATE audit SET detail = 'x' WHERE id = 2", [])
            .unwrap();
        assert_eq!(kind(&s), Some((BreakKind::Edited, 2)));
        w().execute("UPDATE audit SET detail = '' WHERE id = 2", [])
            .unwrap();
        w().execute(
            "INSERT INTO audit (at_ms, actor, action, allowed) VALUES (1, 'mallory', 'x', 1)",
            [],
        )
        .unwrap();
        assert_eq!(kind(&s), Some((BreakKind::Inserted, 5)));
        let err = s.append_audit(&[entry("d")]).unwrap_err().to_string();
        assert!(
            err.contains("did not write") && err.contains("audit verify"),
            "{err}"
        );
        // NULLing a chain is a break, never an adoption.
        w().execute("DELETE FROM audit WHERE id = 5", []).unwrap();
        w().execute("UPDATE audit SET chain = NULL WHERE id = 3", [])
            .unwrap();
        assert_eq!(kind(&s), Some((BreakKind::Edited, 3)));
        // A deleted head stops every audited write.
        w().execute("DELETE FROM audit_head", []).unwrap();
        let err = s.append_audit(&[entry("e")]).unwrap_err().to_string();
        assert!(err.contains("head row is missing"), "{err}");
    }

    /// A database made before chaining: its entries are chained at the
    /// first open, under the verified key, and never again.
    #[test]
    fn entries_made_before_chaining_are_adopted_once_under_the_right_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let keys = KeyRing::generate().unwrap();
        {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            let before = migrate::MIGRATIONS
                .iter()
                .position(|m| *m == migrate::AUDIT_CHAIN)
                .unwrap();
            for sql in &migrate::MIGRATIONS[..before] {
                conn.execute_batch(sql).unwrap();
            }
            conn.pragma_update(None, "user_version", before as i64)
                .unwrap();
            let check = keys
                .get()
                .current
                .master()
                .seal(KEY_CHECK, KEY_CHECK_PLAINTEXT)
                .unwrap();
            let blob = [check.wrapped_key, check.ciphertext].concat();
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)",
                rusqlite::params![crate::state_dir::META_KEY_CHECK, blob],
            )
            .unwrap();
            for i in 0..3 {
                conn.execute(
                    "INSERT INTO audit (at_ms, actor, action, allowed) VALUES (?1, 'old', 'secret.read', 1)",
                    [i],
                )
                .unwrap();
            }
            let _ = &mut conn;
        }
        // The wrong key: refused, nothing changed.
        let err = SqliteStore::open(&path, false, KeyRing::generate().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not match") && err.contains("nothing was changed"),
            "{err}"
        );
        let s = SqliteStore::open(&path, false, keys.clone()).unwrap();
        let v = s.verify_audit().unwrap();
        assert_eq!((v.checked, v.broken), (3, None));
        s.append_audit(&[entry("new")]).unwrap();
        assert_eq!(s.verify_audit().unwrap().checked, 4);
        // Stripped of its chain afterwards: reopening adopts nothing.
        s.db.writer()
            .execute_batch("UPDATE audit SET chain = NULL; DELETE FROM audit_head;")
            .unwrap();
        drop(s);
        let s = Arc::new(SqliteStore::open(&path, false, keys.clone()).unwrap());
        assert_eq!(kind(&s), Some((BreakKind::Edited, 1)));
        assert!(s.append_audit(&[entry("x")]).is_err());
        // The upgrade replaced the v1 key check with the v2 one.
        let check = s
            .get_meta(crate::state_dir::META_KEY_CHECK)
            .unwrap()
            .unwrap();
        assert_eq!(
            crate::keys::key_check_state(keys.get().current.master(), &check),
            crate::keys::KeyCheckState::Upgraded
        );
    }

    /// Dropping the chain columns and lowering user_version (the reviewer's
    /// attack) no longer gets a forged log adopted: the v2 key check says
    /// the database was upgraded, so the open is refused, nothing changed.
    #[test]
    fn a_schema_rewound_without_the_key_is_refused_not_readopted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let keys = KeyRing::generate().unwrap();
        {
            // A store as `server init` makes it (with a key check).
            let s = SqliteStore::open(&path, true, keys.clone()).unwrap();
            let check = crate::keys::seal_key_check(keys.get().current.master()).unwrap();
            s.put_meta(crate::state_dir::META_KEY_CHECK, &check)
                .unwrap();
            s.append_audit(&[entry("a"), entry("mallory"), entry("c")])
                .unwrap();
            assert_eq!(s.verify_audit().unwrap().broken, None);
        }
        let before = migrate::MIGRATIONS
            .iter()
            .position(|m| *m == migrate::AUDIT_CHAIN)
            .unwrap();
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(&format!(
            "DELETE FROM audit WHERE actor = 'mallory';
             INSERT INTO audit (at_ms, actor, action, allowed) VALUES (5, 'forged', 'secret.delete', 1);
             ALTER TABLE audit DROP COLUMN chain; ALTER TABLE audit DROP COLUMN epoch;
             DROP TABLE audit_head; DROP TABLE row_set; PRAGMA user_version = {before};"
        ))
        .unwrap();
        drop(c);
        let err = SqliteStore::open(&path, false, keys.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("already upgraded")
                && err.contains("rewound")
                && err.contains("nothing was changed"),
            "{err}"
        );
        let c = rusqlite::Connection::open(&path).unwrap();
        let version: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version as usize, before, "nothing migrated");
        // Rewound to before row MACs too: the same.
        c.execute_batch("PRAGMA user_version = 3").unwrap();
        drop(c);
        let err = SqliteStore::open(&path, false, keys)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rewound"), "{err}");
    }

    /// A trigger added while the server runs (the open's check is past)
    /// rewrites an entry between its insert and its chaining: the job
    /// fails, nothing is chained, the log stays whole.
    #[test]
    fn an_entry_changed_between_insert_and_chain_fails_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let keys = KeyRing::generate().unwrap();
        let s = SqliteStore::open(&path, true, keys).unwrap();
        s.append_audit(&[entry("a"), entry("b")]).unwrap();
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch(
            "CREATE TRIGGER hide AFTER INSERT ON audit WHEN NEW.actor = 'evil'
             BEGIN UPDATE audit SET actor = 'alice' WHERE id = NEW.id; END;",
        )
        .unwrap();
        let err = s.append_audit(&[entry("evil")]).unwrap_err().to_string();
        assert!(
            err.contains("changed between its insert and its chaining"),
            "{err}"
        );
        let v = s.verify_audit().unwrap();
        assert_eq!((v.checked, v.broken), (2, None));
        assert!(s
            .query_audit(&Default::default())
            .unwrap()
            .iter()
            .all(|e| e.actor != "alice"));
        // Entries the trigger leaves alone are chained as before.
        s.append_audit(&[entry("c")]).unwrap();
        assert_eq!(s.verify_audit().unwrap().checked, 3);
    }

    /// `allowed = 2` reads as true (the MAC holds) but hides the entry from
    /// `--outcome allowed`: an edited entry.
    #[test]
    fn an_allowed_value_other_than_0_or_1_is_an_edit() {
        let s = SqliteStore::open_in_memory().unwrap();
        s.append_audit(&[entry("a"), entry("b")]).unwrap();
        s.db.writer()
            .execute("UPDATE audit SET allowed = 2 WHERE id = 2", [])
            .unwrap();
        assert_eq!(kind(&s), Some((BreakKind::Edited, 2)));
        let detail = s.verify_audit().unwrap().broken.unwrap().detail;
        assert!(detail.contains("neither 0 nor 1"), "{detail}");
    }

    /// A v1 key check put back into an upgraded database is refused too.
    #[test]
    fn a_pre_upgrade_key_check_in_an_upgraded_database_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let keys = KeyRing::generate().unwrap();
        {
            let s = SqliteStore::open(&path, true, keys.clone()).unwrap();
            let v1 = crate::keys::pre_upgrade_key_check(keys.get().current.master()).unwrap();
            s.put_meta(crate::state_dir::META_KEY_CHECK, &v1).unwrap();
        }
        let err = SqliteStore::open(&path, false, keys)
            .unwrap_err()
            .to_string();
        assert!(err.contains("from before its upgrade"), "{err}");
    }

    /// A trigger put into the file would rewrite entries before they are
    /// chained: the open is refused, naming it.
    #[test]
    fn a_trigger_view_or_unknown_table_in_the_file_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let keys = KeyRing::generate().unwrap();
        {
            let s = SqliteStore::open(&path, true, keys.clone()).unwrap();
            s.append_audit(&[entry("a"), entry("b")]).unwrap();
        }
        for (sql, name) in [
            (
                "CREATE TRIGGER hide AFTER INSERT ON audit WHEN NEW.actor = 'evil'
                 BEGIN UPDATE audit SET actor = 'alice', secret = 'other' WHERE id = NEW.id; END;",
                "trigger \"hide\"",
            ),
            ("CREATE VIEW v AS SELECT * FROM audit", "view \"v\""),
            ("CREATE TABLE stash (x)", "table \"stash\""),
        ] {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(sql).unwrap();
            drop(c);
            let err = SqliteStore::open(&path, false, keys.clone())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(name) && err.contains("Restore it from a backup"),
                "{err}"
            );
            let c = rusqlite::Connection::open(&path).unwrap();
            let drop_sql = match name.split(' ').next().unwrap() {
                "trigger" => "DROP TRIGGER hide",
                "view" => "DROP VIEW v",
                _ => "DROP TABLE stash",
            };
            c.execute_batch(drop_sql).unwrap();
        }
        let s = SqliteStore::open(&path, false, keys).unwrap();
        s.append_audit(&[entry("evil")]).unwrap();
        assert_eq!(s.verify_audit().unwrap().broken, None);
    }
}
