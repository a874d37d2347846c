//! The PostgreSQL schema's migrations, applied in order; the
//! `schema_version` row records how many ran. Append only: never edit a
//! released step. One list of its own (not SQLite's): the first step is
//! the SQLite schema after its sixth, translated.

use postgres::Client;

use super::commit::Tx;
use super::{audit, macs, row_set};
use crate::keys::Keys;
use crate::store::{Result, StoreError};

pub(super) const MIGRATIONS: &[&str] = &[include_str!("migrations/0001_schema.sql")];

/// Serialises `server init` and the upgrades of several replicas starting
/// at once (a transaction-scoped advisory lock; the number is ours).
const MIGRATION_LOCK: i64 = 0x5ec2_e7f5;

/// The tables the migrations make.
pub(super) const KNOWN_TABLES: &[&str] = &[
    "schema_version",
    "meta",
    "secrets",
    "secret_versions",
    "clients",
    "client_certs",
    "groups",
    "group_clients",
    "group_secrets",
    "audit",
    "revision",
    "revoked_certs",
    "audit_head",
    "row_set",
];

/// The triggers the migrations make: name, table, function, and
/// `pg_trigger.tgtype` (the row set's: AFTER INSERT OR UPDATE OR DELETE
/// FOR EACH ROW, 1 + 4 + 8 + 16; TRUNCATE's refusal: BEFORE TRUNCATE FOR
/// EACH STATEMENT, 2 + 32).
const KNOWN_TRIGGERS: &[(&str, &str, &str, i16)] = &[
    (
        "row_set_meta",
        "meta",
        "secretfs_row_set_note_meta",
        ROW_SET,
    ),
    (
        "row_set_clients",
        "clients",
        "secretfs_row_set_note",
        ROW_SET,
    ),
    (
        "row_set_client_certs",
        "client_certs",
        "secretfs_row_set_note",
        ROW_SET,
    ),
    ("row_set_groups", "groups", "secretfs_row_set_note", ROW_SET),
    (
        "row_set_group_clients",
        "group_clients",
        "secretfs_row_set_note",
        ROW_SET,
    ),
    (
        "row_set_group_secrets",
        "group_secrets",
        "secretfs_row_set_note",
        ROW_SET,
    ),
    (
        "row_set_secrets",
        "secrets",
        "secretfs_row_set_note",
        ROW_SET,
    ),
    ("no_truncate_meta", "meta", NO_TRUNCATE, TRUNCATE),
    ("no_truncate_clients", "clients", NO_TRUNCATE, TRUNCATE),
    (
        "no_truncate_client_certs",
        "client_certs",
        NO_TRUNCATE,
        TRUNCATE,
    ),
    ("no_truncate_groups", "groups", NO_TRUNCATE, TRUNCATE),
    (
        "no_truncate_group_clients",
        "group_clients",
        NO_TRUNCATE,
        TRUNCATE,
    ),
    (
        "no_truncate_group_secrets",
        "group_secrets",
        NO_TRUNCATE,
        TRUNCATE,
    ),
    ("no_truncate_secrets", "secrets", NO_TRUNCATE, TRUNCATE),
    ("no_truncate_audit", "audit", NO_TRUNCATE, TRUNCATE),
    (
        "no_truncate_audit_head",
        "audit_head",
        NO_TRUNCATE,
        TRUNCATE,
    ),
    ("no_truncate_row_set", "row_set", NO_TRUNCATE, TRUNCATE),
];
const ROW_SET: i16 = 1 + 4 + 8 + 16;
const TRUNCATE: i16 = 2 + 32;
const NO_TRUNCATE: &str = "secretfs_no_truncate";

/// The body (PostgreSQL's `prosrc`) of the trigger function `name` as the
/// first `version` migrations make it (a database is checked before its
/// pending migrations run): the text between the dollar quotes after the
/// last `CREATE [OR REPLACE] FUNCTION` of it.
pub(super) fn function_body(name: &str, version: usize) -> Option<&'static str> {
    let heads = [
        format!("CREATE FUNCTION {name}()"),
        format!("CREATE OR REPLACE FUNCTION {name}()"),
    ];
    MIGRATIONS[..version.min(MIGRATIONS.len())]
        .iter()
        .rev()
        .find_map(|sql| {
            let at = heads.iter().filter_map(|h| sql.rfind(h.as_str())).max()?;
            let rest = &sql[at..];
            let open = rest.find("$$")? + 2;
            let len = rest[open..].find("$$")?;
            Some(&rest[open..open + len])
        })
}

/// Drops what the migrations made (the tables with their indexes and
/// triggers, and the row set's functions), in one transaction: `server
/// init` undoing the schema it made when a later step failed. Never for a
/// database in use (see `PgStore::drop_schema`).
pub(super) fn drop_all(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    let tables = KNOWN_TABLES.join(", ");
    // Every function a known trigger calls (one list with the open's
    // check, so a function added by a migration is dropped too).
    let mut functions: Vec<&str> = KNOWN_TRIGGERS.iter().map(|t| t.2).collect();
    functions.sort_unstable();
    functions.dedup();
    let functions = functions
        .iter()
        .map(|f| format!("{f}()"))
        .collect::<Vec<_>>()
        .join(", ");
    tx.batch_execute(&format!(
        "DROP TABLE IF EXISTS {tables}; DROP FUNCTION IF EXISTS {functions};"
    ))?;
    tx.commit()?;
    Ok(())
}

/// The relations (tables, views, ...) in the schema the connection works in.
fn relations(tx: &mut Tx<'_>) -> Result<Vec<(String, String)>> {
    tx.query(
        "SELECT c.relname::TEXT, CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                WHEN 'f' THEN 'foreign table' ELSE 'table' END
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
          ORDER BY 2, 1",
        &[],
    )?
    .iter()
    .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
    .collect()
}

/// What the schema holds beyond what the migrations make (a trigger of
/// someone else's, which could rewrite rows and audit entries as the
/// server writes them, a rule, a view, an unknown table), and the row
/// set's triggers it lacks (dropped or disabled: the server's own writes
/// would no longer reach the row set).
fn foreign_objects(tx: &mut Tx<'_>, version: usize) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for (name, kind) in relations(tx)? {
        if kind == "table" && KNOWN_TABLES.contains(&name.as_str()) {
            continue;
        }
        found.push(format!(
            "{kind} {:?}",
            name.chars().take(64).collect::<String>()
        ));
    }
    let mut ours = Vec::new();
    // Ours by name, but not as the migrations made them (already reported).
    let mut changed = Vec::new();
    for r in tx.query(
        "SELECT t.tgname::TEXT, c.relname::TEXT, t.tgenabled IN ('O', 'A'), p.proname::TEXT,
                p.prosrc, p.pronamespace = c.relnamespace, t.tgtype,
                t.tgqual IS NULL AND pg_catalog.cardinality(t.tgattr::int2[]) = 0 AND t.tgnargs = 0,
                p.proconfig = ARRAY['search_path=pg_catalog, pg_temp']
           FROM pg_trigger t
           JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
           JOIN pg_proc p ON p.oid = t.tgfoid
          WHERE n.nspname = current_schema() AND NOT t.tgisinternal ORDER BY 1",
        &[],
    )? {
        let name: String = r.try_get(0)?;
        let table: String = r.try_get(1)?;
        let enabled: bool = r.try_get(2)?;
        let function: String = r.try_get(3)?;
        let body: String = r.try_get(4)?;
        let same_schema: bool = r.try_get(5)?;
        let kind: i16 = r.try_get(6)?;
        let plain: bool = r.try_get(7)?;
        let pinned: Option<bool> = r.try_get(8)?;
        let known = KNOWN_TRIGGERS.iter().find(|k| k.0 == name);
        let Some(&(_, want_table, want_function, want_kind)) = known else {
            found.push(format!(
                "trigger {:?}",
                name.chars().take(64).collect::<String>()
            ));
            continue;
        };
        let as_made = table == want_table
            && function == want_function
            && same_schema
            && kind == want_kind
            && plain
            && pinned == Some(true)
            && function_body(want_function, version) == Some(body.as_str());
        if !as_made {
            found.push(format!(
                "its trigger {name:?} or its function {want_function:?} changed from what \
                 the migrations make"
            ));
            changed.push(name);
        } else if enabled {
            ours.push(name);
        }
    }
    for (name, ..) in KNOWN_TRIGGERS {
        if !ours.iter().any(|o| o == name) && !changed.iter().any(|c| c == name) {
            found.push(format!("its trigger {name:?} missing or disabled"));
        }
    }
    for r in tx.query(
        "SELECT r.rulename::TEXT FROM pg_rewrite r JOIN pg_class c ON c.oid = r.ev_class
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') ORDER BY 1",
        &[],
    )? {
        let name: String = r.try_get(0)?;
        found.push(format!(
            "rule {:?}",
            name.chars().take(64).collect::<String>()
        ));
    }
    Ok(found)
}

fn check_objects(tx: &mut Tx<'_>, version: usize) -> Result<()> {
    let found = foreign_objects(tx, version)?;
    if found.is_empty() {
        return Ok(());
    }
    Err(StoreError::Check(
        format!(
            "the database holds {}, which is not the schema secretfs makes: it was edited \
             without the server (a trigger or rule can rewrite rows and audit entries as they \
             are written). Put it right after review, or restore the database from a backup; \
             nothing was changed",
            found.join(", ")
        )
        .into(),
    ))
}

fn version(tx: &mut Tx<'_>) -> Result<Option<usize>> {
    let has: bool = tx
        .one(
            "SELECT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = current_schema() AND c.relname = 'schema_version')",
            &[],
        )?
        .try_get(0)?;
    if !has {
        return Ok(None);
    }
    let v: Option<i64> = tx
        .opt("SELECT version FROM schema_version WHERE id = 1", &[])?
        .map(|r| r.try_get(0))
        .transpose()?;
    Ok(Some(v.unwrap_or(0) as usize))
}

fn run_in<T>(
    client: &mut Client,
    cache: &mut std::collections::HashMap<&'static str, postgres::Statement>,
    f: impl FnOnce(&mut Tx<'_>) -> Result<T>,
) -> Result<T> {
    super::commit::in_transaction(client, cache, "BEGIN", f)
}

/// Whether the database has migrations this version would run.
pub(super) fn needs_upgrade(client: &mut Client) -> Result<bool> {
    let mut cache = Default::default();
    run_in(client, &mut cache, |tx| {
        Ok(match version(tx)? {
            None => false,
            Some(v) => v < MIGRATIONS.len(),
        })
    })
}

/// Makes the schema (`create`: the database must hold no table), or
/// checks it and brings it up to date.
pub(super) fn open(client: &mut Client, create: bool, keys: &Keys, url: &str) -> Result<()> {
    let mut cache = Default::default();
    run_in(client, &mut cache, |tx| {
        tx.one("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        let found = version(tx)?;
        if create {
            let tables = relations(tx)?;
            if !tables.is_empty() {
                let names: Vec<String> = tables.iter().take(5).map(|(n, _)| n.clone()).collect();
                return Err(StoreError::Check(
                    format!(
                        "the database at {url} already holds tables ({}{}){}: it is someone's \
                         data, and `server init` makes a new store only in an empty database. \
                         To add a replica of the store it holds, use `secretfs server init \
                         --database URL --join`; else give an empty database",
                        names.join(", "),
                        if tables.len() > 5 { ", ..." } else { "" },
                        if found.is_some() {
                            ", a secretfs store"
                        } else {
                            ""
                        },
                    )
                    .into(),
                ));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate() {
                tx.batch(sql)?;
                set_version(tx, i + 1)?;
            }
            // What a new store starts with, under the key: the marker that
            // its rows are authenticated, the audit head, the row set.
            macs::put_marker(tx, keys)?;
            audit::start(tx, keys)?;
            row_set::forget_pending(tx)?;
            row_set::sign_all(tx, keys)?;
            return Ok(());
        }
        let Some(found) = found else {
            let empty = relations(tx)?.is_empty();
            return Err(StoreError::Check(
                if empty {
                    format!(
                        "the database at {url} is empty: make the store in it first with \
                         `secretfs server init --database URL`"
                    )
                } else {
                    format!(
                        "the database at {url} holds tables but no secretfs store: give the URL \
                         of the database `secretfs server init --database URL` made"
                    )
                }
                .into(),
            ));
        };
        if found > MIGRATIONS.len() {
            return Err(StoreError::NewerSchema {
                found: found as u64,
                known: MIGRATIONS.len() as u64,
            });
        }
        check_objects(tx, found)?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found) {
            tx.batch(sql)?;
            set_version(tx, i + 1)?;
        }
        Ok(())
    })
}

fn set_version(tx: &mut Tx<'_>, v: usize) -> Result<()> {
    tx.exec(
        "INSERT INTO schema_version (id, version) VALUES (1, $1)
         ON CONFLICT (id) DO UPDATE SET version = excluded.version",
        &[&(v as i64)],
    )?;
    Ok(())
}
