//! The PostgreSQL store against a real PostgreSQL (`secretfs-pgtest`):
//! the conformance suite, the integrity tests that are about behaviour
//! (rows edited behind the store's back), opening, and two stores on one
//! database (two replicas).

use std::sync::Arc;

use secretfs_pgtest::PgCluster;
use zeroize::Zeroizing;

use super::*;
use crate::store::conformance;

fn config(url: &str) -> PgConfig {
    PgConfig::parse(url, None).unwrap()
}

/// A new store in a fresh database; its URL.
fn fresh(keys: Arc<KeyRing>) -> (PgStore, String) {
    let url = PgCluster::shared().database();
    (PgStore::open(&config(&url), true, keys).unwrap(), url)
}

fn db_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

/// Runs SQL on the store's database as the superuser, behind the store's
/// back (as someone without the master key would). SQLite's `X'..'` blob
/// literals (the shared tests') are PostgreSQL's `'\x..'::bytea`. The
/// session has a pending table of its own (else the row set's triggers
/// refuse its writes) that nothing ever folds in.
fn raw_on(url: &str) -> impl Fn(&str) {
    let client = std::sync::Mutex::new(PgCluster::shared().superuser_on(db_name(url)));
    client
        .lock()
        .unwrap()
        .batch_execute("CREATE TEMP TABLE row_set_pending (kind TEXT NOT NULL, mac BYTEA)")
        .unwrap();
    move |sql: &str| {
        let mut out = String::new();
        let mut rest = sql;
        while let Some(i) = rest.find("X'") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let end = after.find('\'').unwrap();
            out.push_str(&format!("'\\x{}'::bytea", &after[..end]));
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        client
            .lock()
            .unwrap()
            .batch_execute(&out)
            .unwrap_or_else(|e| panic!("{out}: {}", conn::describe(&e)));
    }
}

#[test]
fn conforms() {
    conformance::run(&|| Box::new(fresh(KeyRing::generate().unwrap()).0));
}

#[test]
fn tampered_rows_are_absent() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    conformance::tampered_rows_are_absent(&s, &raw_on(&url));
}

#[test]
fn replayed_rows_are_detected() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    conformance::replayed_rows_are_detected(&s, &raw_on(&url));
}

#[test]
fn concurrent_writes() {
    let (s, _) = fresh(KeyRing::generate().unwrap());
    let s = Arc::new(s);
    let before = s.pool.commits();
    conformance::concurrent_writes(s.clone());
    // 600 writes (200 that commit work, 400 that fail) took fewer commits.
    let commits = s.pool.commits() - before;
    assert!(
        commits < 600,
        "{commits} commits for 600 writes: no group commit happened"
    );
}

/// Waits (bounded) until `n` writers are queued for the writer connection.
fn until_queued(s: &PgStore, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while s.pool.queued() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "{n} writers never queued for the writer connection ({} did)",
            s.pool.queued()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn writers_that_queue_share_one_commit_and_a_failing_job_rolls_back_alone() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    const ROTATIONS: usize = 10;
    for i in 0..ROTATIONS {
        add_secret(&s, &format!("s{i}"));
    }
    add_secret(&s, "taken");
    let start = s.revision().unwrap();
    let audited = |s: &PgStore| {
        s.query_audit(&AuditFilter {
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .len()
    };
    let audit_before = audited(&s);
    let mut listener = PgCluster::shared().superuser_on(db_name(&url));
    listener
        .batch_execute(&format!("LISTEN {}", notify::CHANNEL))
        .unwrap();
    let commits = s.pool.commits();
    // Queued behind the first: the other rotations, three jobs that fail
    // (an update of a missing secret, a name taken, a seal that fails after the job
    // wrote its version's row), and a read's audit entry.
    const QUEUED: usize = ROTATIONS - 1 + 3 + 1;
    let (inside, is_inside) = std::sync::mpsc::channel();
    let s = &s;
    let (first, revisions, failures) = std::thread::scope(|scope| {
        let first = scope.spawn(move || {
            let mut seal = |id: u64, v: u64| {
                inside.send(()).unwrap();
                // The writer connection is held until all are queued.
                until_queued(s, QUEUED);
                sealed(id, v)
            };
            s.rotate_secret("s0", 20, None, &entry("rotate"), &mut seal)
                .unwrap()
                .revision
        });
        is_inside.recv().unwrap();
        let rotations: Vec<_> = (1..ROTATIONS)
            .map(|i| {
                scope.spawn(move || {
                    s.rotate_secret(&format!("s{i}"), 20, None, &entry("rotate"), &mut sealed)
                        .unwrap()
                        .revision
                })
            })
            .collect();
        let failing = [
            // (A rotation of a missing secret fails before the writer: it
            // reads the secret first, off the lock.)
            scope.spawn(|| {
                let update = SecretUpdate {
                    description: Some("d".into()),
                    ..Default::default()
                };
                s.update_secret("missing", &update, &|_| Ok(()), &entry("update"))
                    .map(|_| ())
            }),
            scope.spawn(|| {
                let new = NewSecret {
                    name: "taken".into(),
                    size: 20,
                    ..Default::default()
                };
                s.create_secret(&new, &entry("create"), &mut sealed)
                    .map(|_| ())
            }),
            scope.spawn(|| {
                let mut seal = |_: u64, _: u64| Err(StoreError::Seal("boom".into()));
                s.rotate_secret("s1", 20, None, &entry("rotate"), &mut seal)
                    .map(|_| ())
            }),
        ];
        let read_audit = scope.spawn(|| s.append_audit(&[entry("read")]).unwrap());
        let revisions: Vec<u64> = rotations.into_iter().map(|t| t.join().unwrap()).collect();
        let failures: Vec<_> = failing.into_iter().map(|t| t.join().unwrap()).collect();
        read_audit.join().unwrap();
        (first.join().unwrap(), revisions, failures)
    });
    // All in one transaction: one COMMIT for fifteen writes.
    assert_eq!(s.pool.commits() - commits, 1);
    // Each failing job failed alone, with its own error.
    assert!(
        matches!(failures[0], Err(StoreError::NotFound { .. })),
        "{:?}",
        failures[0]
    );
    assert!(
        matches!(failures[1], Err(StoreError::AlreadyExists { .. })),
        "{:?}",
        failures[1]
    );
    assert!(
        matches!(failures[2], Err(StoreError::Seal(_))),
        "{:?}",
        failures[2]
    );
    // Each rotation got its own revision, with no gap: the failed jobs'
    // revisions rolled back with them.
    let mut all: Vec<u64> = revisions.iter().copied().chain([first]).collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (start + 1..=start + ROTATIONS as u64).collect::<Vec<_>>()
    );
    assert_eq!(s.revision().unwrap(), start + ROTATIONS as u64);
    for i in 0..ROTATIONS {
        let now = s.get_secret(&format!("s{i}")).unwrap();
        assert_eq!((now.current_version, now.version_count), (2, 2), "s{i}");
    }
    assert_eq!(s.list_versions("s1").unwrap().len(), 2);
    assert!(s.get_secret("missing").is_err());
    // Only the jobs that committed left audit entries, chained.
    assert_eq!(audited(s), audit_before + ROTATIONS + 1);
    assert_eq!(s.verify_audit().unwrap().broken, None);
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(s.check_row_set().unwrap(), None);
    // Each change was announced with its own revision.
    let mut got = Vec::new();
    let mut notifications = listener.notifications();
    let mut waits = notifications.timeout_iter(std::time::Duration::from_secs(30));
    use ::postgres::fallible_iterator::FallibleIterator;
    while got.len() < ROTATIONS {
        let n = waits.next().unwrap().expect("a notification within 30 s");
        match notify::parse(n.payload()).unwrap() {
            Change::Secret { revision, .. } => got.push(revision),
            other => panic!("{other:?}"),
        }
    }
    got.sort_unstable();
    assert_eq!(got, all);
}

#[test]
fn a_change_does_not_join_a_batch_that_holds_only_the_audit_head() {
    let keys = KeyRing::generate().unwrap();
    let (s, _) = fresh(keys.clone());
    add_secret(&s, "db");
    let commits = s.pool.commits();
    let s = &s;
    let (inside, is_inside) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let read = scope.spawn(move || {
            let k = keys.get();
            s.pool.write(&k, Write::AuditOnly, |tx| {
                inside.send(()).unwrap();
                until_queued(s, 1);
                audit::insert(tx, &entry("read"))
            })
        });
        is_inside.recv().unwrap();
        let rotate = scope.spawn(|| {
            s.rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
                .unwrap()
        });
        read.join().unwrap().unwrap();
        rotate.join().unwrap();
    });
    // The audit-only batch (the head's lock without the revision row's)
    // was committed before the change took the revision row: one lock
    // order, revision row then head, on every replica.
    assert_eq!(s.pool.commits() - commits, 2);
    assert_eq!(s.get_secret("db").unwrap().version_count, 2);
    assert_eq!(s.verify_audit().unwrap().broken, None);
}

fn entry(actor: &str) -> AuditEntry {
    AuditEntry {
        actor: actor.into(),
        action: "secret.read".into(),
        allowed: true,
        ..Default::default()
    }
}

fn sealed(_: u64, _: u64) -> Result<crate::envelope::Sealed> {
    Ok(crate::envelope::Sealed {
        wrapped_key: vec![1; 60],
        ciphertext: vec![2; 20],
    })
}

fn add_secret(s: &PgStore, name: &str) -> SecretRecord {
    let new = NewSecret {
        name: name.into(),
        size: 20,
        ..Default::default()
    };
    s.create_secret(&new, &conformance::entry("secret.create"), &mut sealed)
        .unwrap()
        .value
}

fn broken(s: &PgStore) -> Option<(audit_chain::BreakKind, u64)> {
    s.verify_audit().unwrap().broken.map(|b| (b.kind, b.id))
}

#[test]
fn the_audit_chain_catches_edits_forgeries_and_a_deleted_head() {
    use audit_chain::BreakKind;
    let (s, url) = fresh(KeyRing::generate().unwrap());
    let raw = raw_on(&url);
    s.append_audit(&[entry("a"), entry("b")]).unwrap();
    s.create_group("g", "", &entry("admin")).unwrap();
    s.append_audit(&[entry("c")]).unwrap();
    assert_eq!(broken(&s), None);

    raw("UPDATE audit SET detail = 'x' WHERE id = 2");
    assert_eq!(broken(&s), Some((BreakKind::Edited, 2)));
    raw("UPDATE audit SET detail = '' WHERE id = 2");
    assert_eq!(broken(&s), None);
    // `allowed` other than 0 or 1 reads as true but escapes the filter.
    raw("UPDATE audit SET allowed = 2 WHERE id = 3");
    let b = s.verify_audit().unwrap().broken.unwrap();
    assert_eq!((b.kind, b.id), (BreakKind::Edited, 3));
    assert!(b.detail.contains("neither 0 nor 1"), "{}", b.detail);
    raw("UPDATE audit SET allowed = 1 WHERE id = 3");

    // An entry forged after the head: found, and no write adopts it
    // (whether it took the next id or a later one).
    for id in [5, 9] {
        raw(&format!(
            "INSERT INTO audit (id, at_ms, actor, action, allowed) VALUES ({id}, 1, 'mallory', 'x', 1)"
        ));
        assert_eq!(broken(&s), Some((BreakKind::Inserted, id)));
        for err in [
            s.append_audit(&[entry("d")]).unwrap_err(),
            s.create_group("h", "", &entry("admin")).unwrap_err(),
        ] {
            let err = err.to_string();
            assert!(
                err.contains("did not write") && err.contains("audit verify"),
                "{err}"
            );
        }
        raw(&format!("DELETE FROM audit WHERE id = {id}"));
    }
    assert_eq!(broken(&s), None);
    assert!(s.get_group("h").is_err(), "the refused write left nothing");
    // A trigger added while the server runs (past the open's check)
    // rewrites an entry as it is inserted: the row does not come back as
    // written, the job fails, nothing is chained, the log stays whole.
    raw(
        "CREATE FUNCTION hide() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.actor = 'evil' THEN NEW.actor := 'alice'; END IF; RETURN NEW; END $$;
         CREATE TRIGGER hide BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION hide()",
    );
    let err = s.append_audit(&[entry("evil")]).unwrap_err().to_string();
    assert!(
        err.contains("other than the server wrote it") && err.contains("trigger"),
        "{err}"
    );
    s.append_audit(&[entry("fine")]).unwrap();
    raw("DROP TRIGGER hide ON audit");
    assert_eq!(broken(&s), None);
    assert!(s
        .query_audit(&Default::default())
        .unwrap()
        .iter()
        .all(|e| e.actor != "alice"));
    // A deleted head stops every audited write.
    raw("DELETE FROM audit_head");
    let err = s.append_audit(&[entry("e")]).unwrap_err().to_string();
    assert!(err.contains("head row is missing"), "{err}");
}

#[test]
fn a_trigger_or_unknown_table_in_the_schema_is_refused_at_open() {
    let keys = KeyRing::generate().unwrap();
    let (s, url) = fresh(keys.clone());
    s.append_audit(&[entry("a")]).unwrap();
    drop(s);
    let raw = raw_on(&url);
    let restore_note = format!(
        "CREATE OR REPLACE FUNCTION secretfs_row_set_note() RETURNS trigger LANGUAGE plpgsql
             SET search_path = pg_catalog, pg_temp AS $${}$$",
        migrate::function_body("secretfs_row_set_note", migrate::MIGRATIONS.len()).unwrap()
    );
    raw(
        "CREATE FUNCTION hide() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.actor := 'alice'; RETURN NEW; END $$",
    );
    for (sql, name, undo) in [
        (
            "CREATE TRIGGER hide BEFORE INSERT ON audit FOR EACH ROW EXECUTE FUNCTION hide()",
            "trigger \"hide\"",
            "DROP TRIGGER hide ON audit",
        ),
        (
            "CREATE VIEW v AS SELECT * FROM audit",
            "view \"v\"",
            "DROP VIEW v",
        ),
        (
            "CREATE TABLE stash (x INT)",
            "table \"stash\"",
            "DROP TABLE stash",
        ),
        (
            "CREATE RULE keep AS ON DELETE TO audit DO INSTEAD NOTHING",
            "rule \"keep\"",
            "DROP RULE keep ON audit",
        ),
        (
            "ALTER TABLE group_clients DISABLE TRIGGER row_set_group_clients",
            "trigger \"row_set_group_clients\" missing or disabled",
            "ALTER TABLE group_clients ENABLE TRIGGER row_set_group_clients",
        ),
        (
            "DROP TRIGGER row_set_secrets ON secrets",
            "trigger \"row_set_secrets\" missing or disabled",
            "CREATE TRIGGER row_set_secrets AFTER INSERT OR UPDATE OR DELETE ON secrets
                 FOR EACH ROW EXECUTE FUNCTION secretfs_row_set_note()",
        ),
        (
            "ALTER TABLE secrets ENABLE REPLICA TRIGGER row_set_secrets",
            "trigger \"row_set_secrets\" missing or disabled",
            "ALTER TABLE secrets ENABLE TRIGGER row_set_secrets",
        ),
        (
            "ALTER TABLE audit DISABLE TRIGGER no_truncate_audit",
            "trigger \"no_truncate_audit\" missing or disabled",
            "ALTER TABLE audit ENABLE TRIGGER no_truncate_audit",
        ),
        (
            "CREATE OR REPLACE FUNCTION secretfs_row_set_note() RETURNS trigger
                 LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
                 AS $$ BEGIN RETURN NULL; END $$",
            "function \"secretfs_row_set_note\" changed",
            restore_note.as_str(),
        ),
        (
            "ALTER FUNCTION secretfs_row_set_note() RESET search_path",
            "function \"secretfs_row_set_note\" changed",
            restore_note.as_str(),
        ),
        (
            "CREATE OR REPLACE TRIGGER row_set_clients AFTER INSERT ON clients
                 FOR EACH ROW EXECUTE FUNCTION secretfs_row_set_note()",
            "trigger \"row_set_clients\" or its function",
            "CREATE OR REPLACE TRIGGER row_set_clients AFTER INSERT OR UPDATE OR DELETE ON clients
                 FOR EACH ROW EXECUTE FUNCTION secretfs_row_set_note()",
        ),
    ] {
        raw(sql);
        let err = PgStore::open(&config(&url), false, keys.clone())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(name) && err.contains("nothing was changed"),
            "{err}"
        );
        raw(undo);
    }
    let s = PgStore::open(&config(&url), false, keys).unwrap();
    s.append_audit(&[entry("evil")]).unwrap();
    assert_eq!(broken(&s), None);
}

#[test]
fn a_session_that_is_not_the_stores_cannot_write_protected_rows() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    add_secret(&s, "db");
    let mut other = PgCluster::shared().superuser_on(db_name(&url));
    let err = other
        .batch_execute("UPDATE secrets SET mode = 511")
        .unwrap_err();
    assert!(conn::describe(&err).contains("row_set_pending"), "{err}");
    // Unprotected tables are not stopped (their own checks cover them).
    other
        .batch_execute("UPDATE secret_versions SET size = size")
        .unwrap();
    assert_eq!(s.verify_rows().unwrap(), vec![]);
}

#[test]
fn reseal_moves_rows_to_the_new_key_in_batches() {
    use crate::envelope::MasterKey;
    use crate::keys::{KeySet, Keys};
    let old = "44".repeat(32);
    let new = "55".repeat(32);
    let keys = KeyRing::new(MasterKey::from_hex(&old).unwrap());
    let (s, url) = fresh(keys.clone());
    let raw = raw_on(&url);
    conformance::tampered_rows_are_absent(&s, &raw);
    raw("UPDATE clients SET admin = 1 WHERE name = 'app'");
    let bad = s.verify_rows().unwrap();
    assert_eq!(bad.len(), 1);
    assert_eq!(
        s.reseal_rows(10).unwrap(),
        0,
        "nothing to do without a rekey"
    );
    keys.replace(Keys {
        current: KeySet::new(2, MasterKey::from_hex(&new).unwrap()).into(),
        previous: Some(KeySet::new(1, MasterKey::from_hex(&old).unwrap()).into()),
        retired_audit: Default::default(),
    });
    assert_eq!(
        s.verify_rows().unwrap(),
        bad,
        "old MACs are good during a rekey"
    );
    let mut moved = 0;
    loop {
        let n = s.reseal_rows(3).unwrap();
        assert!(n <= 3);
        if n == 0 {
            break;
        }
        moved += n;
    }
    assert!(moved > 10, "{moved}");
    keys.replace(Keys {
        current: KeySet::new(2, MasterKey::from_hex(&new).unwrap()).into(),
        previous: None,
        retired_audit: Default::default(),
    });
    assert_eq!(s.verify_rows().unwrap(), bad);
    assert_eq!(s.check_row_set().unwrap(), None);
    assert!(s.authenticate("other", "serial-new").unwrap().serial_issued);
}

#[test]
fn a_rekey_does_not_move_a_row_set_that_disagrees() {
    use crate::envelope::MasterKey;
    use crate::keys::{KeySet, Keys};
    let old = "66".repeat(32);
    let keys = KeyRing::new(MasterKey::from_hex(&old).unwrap());
    let (s, url) = fresh(keys.clone());
    let raw = raw_on(&url);
    conformance::tampered_rows_are_absent(&s, &raw);
    keys.replace(Keys {
        current: KeySet::new(2, MasterKey::from_hex(&"77".repeat(32)).unwrap()).into(),
        previous: Some(KeySet::new(1, MasterKey::from_hex(&old).unwrap()).into()),
        retired_audit: Default::default(),
    });
    s.create_group("during", "", &conformance::entry("group.create"))
        .unwrap();
    raw("DELETE FROM group_clients");
    while s.reseal_rows(5).map(|n| n > 0).unwrap_or(false) {}
    let err = s.reseal_rows(5).unwrap_err().to_string();
    assert!(
        err.contains("the rekey cannot finish") && err.contains("--accept"),
        "{err}"
    );
    s.accept_row_set(&conformance::entry("integrity.accept"))
        .unwrap();
    assert_eq!(s.reseal_rows(5).unwrap(), 0);
    keys.replace(Keys {
        current: KeySet::new(2, MasterKey::from_hex(&"77".repeat(32)).unwrap()).into(),
        previous: None,
        retired_audit: Default::default(),
    });
    assert_eq!(s.check_row_set().unwrap(), None);
}

#[test]
fn rewrap_moves_every_version_from_its_cursor_and_lists_what_does_not_open() {
    use crate::envelope::{Binding, MasterKey};
    use crate::keys::{KeySet, Keys};
    let old = KeySet::new(1, MasterKey::generate().unwrap());
    let new = KeySet::new(2, MasterKey::generate().unwrap());
    let ring = KeyRing::of(Keys::of(old.at_epoch(1).into(), None));
    let (s, _) = fresh(ring.clone());
    let add = |name: &str, content: &[u8]| {
        let new = NewSecret {
            name: name.into(),
            size: content.len() as u64,
            ..Default::default()
        };
        let ring = ring.clone();
        s.create_secret(
            &new,
            &conformance::entry("secret.create"),
            &mut |id, version| {
                let binding = Binding {
                    secret_id: id,
                    name,
                    version,
                };
                Ok(ring.get().current.master().seal(binding, content).unwrap())
            },
        )
        .unwrap();
    };
    for i in 0..6u8 {
        add(&format!("s{i}"), &[i; 5]);
    }
    assert_eq!(s.rewrap_keys(4).unwrap(), 0, "no rekey, nothing to do");
    assert_eq!(s.versions_not_opening(old.master()).unwrap(), vec![]);
    assert_eq!(s.versions_not_opening(new.master()).unwrap().len(), 6);
    ring.replace(Keys::of(
        new.at_epoch(2).into(),
        Some(old.at_epoch(1).into()),
    ));
    add("during", b"late");
    assert_eq!(s.rewrap_keys(4).unwrap(), 4);
    assert_eq!(s.versions_not_opening(new.master()).unwrap().len(), 2);
    assert_eq!(s.rewrap_keys(4).unwrap(), 3);
    assert_eq!(s.rewrap_keys(4).unwrap(), 0);
    assert_eq!(s.versions_not_opening(new.master()).unwrap(), vec![]);
    assert_eq!(s.versions_not_opening(old.master()).unwrap().len(), 7);
}

#[test]
fn the_url_policy_allows_clear_text_only_to_loopback_and_checks_tls_fully() {
    let ok = |url: &str| PgConfig::parse(url, None).unwrap().tls;
    let refused = |url: &str| PgConfig::parse(url, None).unwrap_err().to_string();
    assert_eq!(ok("postgres://u@127.0.0.1:5432/db"), conn::Tls::Off);
    assert_eq!(ok("postgresql://u@localhost/db"), conn::Tls::Off);
    assert_eq!(ok("postgres://u@[::1]:5432/db"), conn::Tls::Off);
    assert_eq!(ok("postgres://u@/db?host=/run/postgresql"), conn::Tls::Off);
    assert_eq!(
        ok("postgres://u@db.example.com/db?sslmode=disable"),
        conn::Tls::Off
    );
    assert_eq!(
        ok("postgres://u@db.example.com/db?sslmode=verify-full&sslrootcert=/etc/ca%20x.pem"),
        conn::Tls::VerifyFull("/etc/ca x.pem".into())
    );
    let err = refused("postgres://u@db.example.com/db");
    assert!(
        err.contains("sslmode=verify-full&sslrootcert=CA.pem") && err.contains("sslmode=disable"),
        "{err}"
    );
    for mode in ["require", "verify-ca", "prefer", "allow"] {
        let err = refused(&format!("postgres://u@db.example.com/db?sslmode={mode}"));
        assert!(err.contains(mode) && err.contains("verify-full"), "{err}");
    }
    let err = refused("postgres://u@db.example.com/db?sslmode=verify-full");
    assert!(err.contains("sslrootcert"), "{err}");
    assert!(refused("postgres://u@h/db?sslmode=bogus").contains("unknown sslmode"));
    assert!(refused("mysql://u@h/db").contains("not a PostgreSQL URL"));
    assert!(refused("postgres://127.0.0.1/db").contains("names no user"));
}

#[test]
fn the_password_is_never_shown_and_the_given_one_wins() {
    for url in [
        "postgres://app:hunter2@127.0.0.1:5432/db",
        "postgres://app@127.0.0.1:5432/db?password=hunter2&connect_timeout=3",
    ] {
        let cfg = PgConfig::parse(url, None).unwrap();
        assert_eq!(cfg.config.get_password(), Some(&b"hunter2"[..]));
        assert!(!cfg.redacted().contains("hunter2"), "{}", cfg.redacted());
        assert!(
            cfg.redacted().contains("app@127.0.0.1:5432/db"),
            "{}",
            cfg.redacted()
        );
        assert!(!format!("{cfg:?}").contains("hunter2"));
        let given = PgConfig::parse(url, Some(Zeroizing::new("s3cret".into()))).unwrap();
        assert_eq!(given.config.get_password(), Some(&b"s3cret"[..]));
        // An unparseable URL's error does not show it either.
        let bad = url.replace("5432", "notaport");
        let err = PgConfig::parse(&bad, None).unwrap_err().to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }
    // The timeout the URL gives is kept; else a bounded default.
    let cfg = PgConfig::parse("postgres://u@127.0.0.1/db?connect_timeout=3", None).unwrap();
    assert_eq!(
        cfg.config.get_connect_timeout(),
        Some(&std::time::Duration::from_secs(3))
    );
    let cfg = PgConfig::parse("postgres://u@127.0.0.1/db", None).unwrap();
    assert_eq!(
        cfg.config.get_connect_timeout(),
        Some(&conn::CONNECT_TIMEOUT)
    );
}

#[test]
fn bad_connections_are_clear_errors_without_the_password() {
    let pg = PgCluster::shared();
    let keys = KeyRing::generate().unwrap();
    let url = pg.database();
    let open = |url: &str, password: Option<&str>| {
        let cfg = PgConfig::parse(url, password.map(|p| Zeroizing::new(p.to_owned()))).unwrap();
        let err = PgStore::open(&cfg, true, keys.clone()).unwrap_err();
        let text = err.to_string();
        assert!(
            !text.contains("wrong-password") && !text.contains(secretfs_pgtest::PASSWORD),
            "{text}"
        );
        assert!(!format!("{err:?}").contains("wrong-password"));
        (err, text)
    };
    let (_, err) = open(&url, Some("wrong-password"));
    assert!(
        err.contains("refused the login") && err.contains("password"),
        "{err}"
    );
    let (_, err) = open(&url.replace(db_name(&url), "nosuchdb"), None);
    assert!(
        err.contains("\"nosuchdb\" does not exist") && err.contains("createdb"),
        "{err}"
    );
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (e, err) = open(
        &url.replace(&pg.port().to_string(), &port.to_string()),
        None,
    );
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
}

#[test]
fn open_refuses_what_is_not_its_to_take() {
    let keys = KeyRing::generate().unwrap();
    let pg = PgCluster::shared();
    // An empty database without `create`: names `server init`.
    let empty = pg.database();
    let err = PgStore::open(&config(&empty), false, keys.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("is empty") && err.contains("server init --database URL"),
        "{err}"
    );
    assert!(!PgStore::needs_upgrade(&config(&empty)).unwrap());
    // `create` on a store already there, or on someone's tables.
    let (s, url) = fresh(keys.clone());
    add_secret(&s, "db");
    let err = PgStore::open(&config(&url), true, keys.clone())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("already holds tables") && err.contains("--join"),
        "{err}"
    );
    let other = pg.database();
    pg.superuser_on(db_name(&other))
        .batch_execute("CREATE TABLE orders (id INT)")
        .unwrap();
    let err = PgStore::open(&config(&other), true, keys.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("orders"), "{err}");
    let err = PgStore::open(&config(&other), false, keys.clone())
        .unwrap_err()
        .to_string();
    assert!(err.contains("no secretfs store"), "{err}");
    // Nothing changed either way.
    assert_eq!(s.get_secret("db").unwrap().version_count, 1);
    // A newer schema is refused, naming both versions; an older one is
    // reported by needs_upgrade.
    assert!(!PgStore::needs_upgrade(&config(&url)).unwrap());
    let raw = raw_on(&url);
    raw("UPDATE schema_version SET version = 99");
    match PgStore::open(&config(&url), false, keys.clone()) {
        Err(
            e @ StoreError::NewerSchema {
                found: 99,
                known: 1,
            },
        ) => {
            assert!(e.to_string().contains("run a newer secretfs"))
        }
        other => panic!("expected NewerSchema, got {other:?}"),
    }
    raw("UPDATE schema_version SET version = 0");
    assert!(PgStore::needs_upgrade(&config(&url)).unwrap());
    raw("UPDATE schema_version SET version = 1");
    let again = PgStore::open(&config(&url), false, keys).unwrap();
    assert_eq!(again.get_secret("db").unwrap().version_count, 1);
}

#[test]
fn the_schema_knows_the_unsigned_meta_key() {
    // The migration's triggers and `row_set::compute` name it literally.
    assert_eq!(integrity::META_UNSIGNED, "master_key_check");
    assert!(migrate::MIGRATIONS[0].contains("'master_key_check'"));
}

#[test]
fn each_change_is_announced_in_its_transaction_and_nothing_else_is() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    let mut listener = PgCluster::shared().superuser_on(db_name(&url));
    listener
        .batch_execute(&format!("LISTEN {}", notify::CHANNEL))
        .unwrap();
    let db = add_secret(&s, "db");
    let created = s.revision().unwrap();
    // What does not commit, or changes no revision, sends nothing.
    assert!(s
        .rotate_secret("nope", 1, None, &entry("x"), &mut sealed)
        .is_err());
    assert!(s.create_group("g", "", &entry("x")).is_ok());
    assert!(s.create_group("g", "", &entry("x")).is_err());
    s.put_meta("trust_domain", b"t").unwrap();
    s.append_audit(&[entry("read")]).unwrap();
    s.remove_client("nobody", &entry("x")).unwrap_err();
    let client = s
        .create_client(
            &NewClient {
                name: "app".into(),
                admin: false,
                cert: None,
            },
            &entry("client.create"),
        )
        .unwrap();
    s.remove_client("app", &entry("client.remove")).unwrap();
    s.delete_secret("db", &entry("secret.delete")).unwrap();
    let want = [
        Change::Secret {
            id: db.id,
            revision: created,
        },
        Change::Access {
            revision: created + 1,
        },
        Change::ClientAdded {
            revision: client.revision,
        },
        Change::ClientRemoved {
            revision: client.revision + 1,
        },
        Change::SecretDeleted {
            id: db.id,
            revision: client.revision + 2,
        },
    ];
    let mut got = Vec::new();
    let mut notifications = listener.notifications();
    let mut waits = notifications.timeout_iter(std::time::Duration::from_secs(30));
    use ::postgres::fallible_iterator::FallibleIterator;
    while got.len() < want.len() {
        let n = waits.next().unwrap().expect("a notification within 30 s");
        assert_eq!(n.channel(), notify::CHANNEL);
        got.push(notify::parse(n.payload()).unwrap());
    }
    assert_eq!(got, want);
}

#[test]
fn two_stores_on_one_database_see_each_other_and_serialise_rotations() {
    let keys = KeyRing::generate().unwrap();
    let (a, url) = fresh(keys.clone());
    let b = PgStore::open(&config(&url), false, keys).unwrap();
    let db = add_secret(&a, "db");
    assert_eq!(b.get_secret("db").unwrap().id, db.id);
    b.create_group("g", "", &entry("admin")).unwrap();
    assert!(a.get_group("g").is_ok());
    assert_eq!(a.revision().unwrap(), b.revision().unwrap());

    const EACH: usize = 150;
    let start = a.revision().unwrap();
    let (a, b) = (Arc::new(a), Arc::new(b));
    let rotate = |s: Arc<PgStore>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            for _ in 0..EACH {
                let c = s
                    .rotate_secret(
                        "db",
                        20,
                        None,
                        &conformance::entry("secret.rotate"),
                        &mut sealed,
                    )
                    .unwrap();
                out.push((c.value.current_version, c.revision));
            }
            out
        })
    };
    let (ta, tb) = (rotate(a.clone()), rotate(b.clone()));
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    for r in [&ra, &rb] {
        assert!(
            r.windows(2).all(|w| w[1].1 > w[0].1 && w[1].0 > w[0].0),
            "{r:?}"
        );
    }
    let mut versions: Vec<u64> = ra.iter().chain(&rb).map(|(v, _)| *v).collect();
    let mut revisions: Vec<u64> = ra.iter().chain(&rb).map(|(_, r)| *r).collect();
    versions.sort_unstable();
    revisions.sort_unstable();
    // Every rotation got its own version and its own revision, with no
    // gap: one sequence across both stores.
    assert_eq!(versions, (2..2 + 2 * EACH as u64).collect::<Vec<_>>());
    assert_eq!(
        revisions,
        (start + 1..start + 1 + 2 * EACH as u64).collect::<Vec<_>>()
    );
    let now = b.get_secret("db").unwrap();
    assert_eq!(now.version_count, 1 + 2 * EACH as u64);
    assert_eq!(now.current_version, now.version_count);
    assert_eq!(a.list_versions("db").unwrap().len(), 1 + 2 * EACH);
    assert_eq!(a.verify_rows().unwrap(), vec![]);
    assert_eq!(b.check_row_set().unwrap(), None);
    assert_eq!(a.verify_audit().unwrap().broken, None);
}

#[test]
fn connections_ended_by_the_database_are_replaced_on_next_use() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    add_secret(&s, "db");
    // Several idle connections in the pool.
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| s.list_secrets().unwrap());
        }
    });
    for round in 0..3 {
        assert!(PgCluster::shared().terminate_connections(db_name(&url)) > 0);
        // A read and a change, each on a pooled connection that is dead:
        // nothing was sent on it, so each is run again on a new one.
        assert_eq!(s.get_secret("db").unwrap().version_count, 1 + round);
        PgCluster::shared().terminate_connections(db_name(&url));
        s.rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
            .unwrap();
    }
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(s.verify_audit().unwrap().broken, None);
}

#[test]
fn a_store_dropped_on_an_async_thread_closes_its_connections_safely() {
    let (s, _) = fresh(KeyRing::generate().unwrap());
    add_secret(&s, "db");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async move {
        // Calls run off the async threads, as the domain runs them.
        let s = tokio::task::spawn_blocking(move || {
            s.get_secret("db").unwrap();
            s
        })
        .await
        .unwrap();
        drop(s);
    });
}

#[test]
fn a_value_of_the_wrong_type_is_a_storage_error_not_an_outage() {
    let url = PgCluster::shared().database();
    let mut c = PgCluster::shared().superuser_on(db_name(&url));
    let e = c
        .query_one("SELECT 'x'::TEXT", &[])
        .unwrap()
        .try_get::<_, i64>(0)
        .unwrap_err();
    assert!(!conn::is_connection_error(&e));
    assert!(matches!(StoreError::from(e), StoreError::Backend(_)));
    let e = c.batch_execute("SELECT nonsense").unwrap_err();
    assert!(!conn::is_connection_error(&e));
    let text = StoreError::from(e).to_string();
    assert!(
        text.contains("nonsense") && text.contains("42703"),
        "{text}"
    );
    PgCluster::shared().terminate_connections(db_name(&url));
    let e = c.batch_execute("SELECT 1").unwrap_err();
    assert!(conn::is_connection_error(&e), "{}", conn::describe(&e));
    assert!(matches!(StoreError::from(e), StoreError::Unavailable(_)));
}

#[test]
fn a_job_hit_by_a_serialization_failure_is_run_again_alone() {
    let keys = KeyRing::generate().unwrap();
    let (s, _) = fresh(keys.clone());
    add_secret(&s, "db");
    let start = s.revision().unwrap();
    let s = &s;
    let (inside, is_inside) = std::sync::mpsc::channel();
    let mut runs = 0;
    let runs = &mut runs;
    let seals = std::sync::atomic::AtomicUsize::new(0);
    let seals = &seals;
    let rotated = std::thread::scope(|scope| {
        let first = scope.spawn(move || {
            let mut seal = |id: u64, v: u64| {
                seals.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                inside.send(()).unwrap();
                until_queued(s, 1);
                sealed(id, v)
            };
            s.rotate_secret("db", 20, None, &entry("rotate"), &mut seal)
                .unwrap()
                .revision
        });
        is_inside.recv().unwrap();
        let k = keys.get();
        // Queued behind the first, in its transaction: fails once as a
        // serialization failure would, then succeeds.
        s.pool
            .write(&k, Write::Locked, |tx| {
                *runs += 1;
                if *runs == 1 {
                    tx.batch(
                        "DO $$ BEGIN RAISE EXCEPTION 'conflict' \
                         USING ERRCODE = 'serialization_failure'; END $$",
                    )?;
                }
                macs::write_meta(tx, &k, "trust_domain", b"again")
            })
            .unwrap();
        first.join().unwrap()
    });
    assert_eq!(*runs, 2);
    // The other job of the batch committed as it was, run once.
    assert_eq!(seals.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(rotated, start + 1);
    assert_eq!(s.get_secret("db").unwrap().version_count, 2);
    assert_eq!(
        s.get_meta("trust_domain").unwrap().as_deref(),
        Some(&b"again"[..])
    );
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(s.check_row_set().unwrap(), None);
    assert_eq!(s.verify_audit().unwrap().broken, None);
}

#[test]
fn a_batch_whose_connection_is_lost_before_commit_is_run_again_on_a_new_one() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    for i in 0..4 {
        add_secret(&s, &format!("s{i}"));
    }
    let start = s.revision().unwrap();
    let s = &s;
    let (inside, is_inside) = std::sync::mpsc::channel();
    let seals = std::sync::atomic::AtomicUsize::new(0);
    let seals = &seals;
    let revisions: Vec<u64> = std::thread::scope(|scope| {
        let first = scope.spawn(move || {
            let mut seal = |id: u64, v: u64| {
                if seals.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    inside.send(()).unwrap();
                    until_queued(s, 3);
                    // PostgreSQL restarts (or fails over) mid-batch.
                    assert!(PgCluster::shared().terminate_connections(db_name(&url)) > 0);
                }
                sealed(id, v)
            };
            s.rotate_secret("s0", 20, None, &entry("rotate"), &mut seal)
                .unwrap()
                .revision
        });
        is_inside.recv().unwrap();
        let others: Vec<_> = (1..4)
            .map(|i| {
                scope.spawn(move || {
                    s.rotate_secret(&format!("s{i}"), 20, None, &entry("rotate"), &mut sealed)
                        .unwrap()
                        .revision
                })
            })
            .collect();
        let mut out = vec![first.join().unwrap()];
        out.extend(others.into_iter().map(|t| t.join().unwrap()));
        out
    });
    // The first job's seal ran again, on the new connection.
    assert_eq!(seals.load(std::sync::atomic::Ordering::SeqCst), 2);
    let mut revisions = revisions;
    revisions.sort_unstable();
    assert_eq!(revisions, (start + 1..=start + 4).collect::<Vec<_>>());
    for i in 0..4 {
        assert_eq!(s.get_secret(&format!("s{i}")).unwrap().version_count, 2);
    }
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(s.verify_audit().unwrap().broken, None);
}

#[test]
fn a_batch_takes_at_most_its_limit_of_jobs() {
    let (s, _) = fresh(KeyRing::generate().unwrap());
    const QUEUED: usize = 40;
    for i in 0..=QUEUED {
        add_secret(&s, &format!("s{i}"));
    }
    let start = s.revision().unwrap();
    let commits = s.pool.commits();
    let s = &s;
    let (inside, is_inside) = std::sync::mpsc::channel();
    let mut revisions: Vec<u64> = std::thread::scope(|scope| {
        let first = scope.spawn(move || {
            let mut seal = |id: u64, v: u64| {
                inside.send(()).unwrap();
                until_queued(s, QUEUED);
                sealed(id, v)
            };
            s.rotate_secret("s0", 20, None, &entry("rotate"), &mut seal)
                .unwrap()
                .revision
        });
        is_inside.recv().unwrap();
        let others: Vec<_> = (1..=QUEUED)
            .map(|i| {
                scope.spawn(move || {
                    s.rotate_secret(&format!("s{i}"), 20, None, &entry("rotate"), &mut sealed)
                        .unwrap()
                        .revision
                })
            })
            .collect();
        let mut out = vec![first.join().unwrap()];
        out.extend(others.into_iter().map(|t| t.join().unwrap()));
        out
    });
    // 41 jobs queued together: a full batch, then the rest.
    assert_eq!(s.pool.commits() - commits, 2);
    revisions.sort_unstable();
    assert_eq!(
        revisions,
        (start + 1..=start + 1 + QUEUED as u64).collect::<Vec<_>>()
    );
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(s.verify_audit().unwrap().broken, None);
}

#[test]
fn the_redacted_url_is_what_the_driver_parsed_without_the_password() {
    for (url, password) in [
        ("postgres://app:hun/ter2@127.0.0.1:5432/db", "hun/ter2"),
        ("postgres://app:hun?ter2@127.0.0.1:5432/db", "hun?ter2"),
        ("postgres://app:hun%40ter2@127.0.0.1:5432/db", "hun@ter2"),
        ("postgres://app:hun%2Fter2@127.0.0.1:5432/db", "hun/ter2"),
        (
            "postgres://app@127.0.0.1:5432/db?pass%77ord=hunter2",
            "hunter2",
        ),
    ] {
        let cfg = PgConfig::parse(url, None).unwrap();
        assert_eq!(
            cfg.config.get_password(),
            Some(password.as_bytes()),
            "{url}"
        );
        let shown = format!("{} {cfg:?}", cfg.redacted());
        for piece in ["hun", "ter2", "hunter2"] {
            assert!(!shown.contains(piece), "{url}: {shown}");
        }
        assert!(
            cfg.redacted()
                .starts_with("postgres://app@127.0.0.1:5432/db"),
            "{url}: {shown}"
        );
    }
    // An '@' left in the password: refused, and nothing after the user shown.
    let err = PgConfig::parse("postgres://app:hun@ter2@127.0.0.1/db", None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("%40") && !err.contains("hun") && !err.contains("ter2"),
        "{err}"
    );
    // What is not secret is kept, and the redacted URL connects as the
    // URL did once the password is given apart.
    let cfg = PgConfig::parse(
        "postgresql://app:pw@db1.example.com:5433,db2.example.com:5434/my%20db?\
         sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=7&\
         hostaddr=10.0.0.1,10.0.0.2&options=-c%20work_mem%3D4MB",
        None,
    )
    .unwrap();
    let again = PgConfig::parse(cfg.redacted(), Some(Zeroizing::new("pw".into()))).unwrap();
    assert_eq!(again.config.get_hosts(), cfg.config.get_hosts());
    assert_eq!(again.config.get_ports(), cfg.config.get_ports());
    assert_eq!(again.config.get_hostaddrs(), cfg.config.get_hostaddrs());
    assert_eq!(again.config.get_dbname(), Some("my db"));
    assert_eq!(again.config.get_options(), cfg.config.get_options());
    assert_eq!(
        again.config.get_connect_timeout(),
        Some(&std::time::Duration::from_secs(7))
    );
    assert_eq!(again.tls, cfg.tls);
    assert_eq!(again.redacted(), cfg.redacted());
    // A URL the driver cannot parse is not shown past its scheme.
    let err = PgConfig::parse("postgres://app:hun/ter2@127.0.0.1:notaport/db", None)
        .unwrap_err()
        .to_string();
    assert!(!err.contains("hun") && !err.contains("ter2"), "{err}");
}

#[test]
fn hostaddr_is_where_the_clear_text_policy_looks() {
    let err = PgConfig::parse("postgres://u@localhost/db?hostaddr=10.0.0.5", None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("in clear"), "{err}");
    let cfg = PgConfig::parse("postgres://u@db.example.com/db?hostaddr=127.0.0.1", None).unwrap();
    assert_eq!(cfg.tls, conn::Tls::Off);
}

/// `url` with session settings given in its `options`.
fn with_options(url: &str, settings: &[(&str, &str)]) -> String {
    let options: Vec<String> = settings
        .iter()
        .map(|(k, v)| format!("-c%20{k}%3D{v}"))
        .collect();
    format!("{url}?options={}", options.join("%20"))
}

#[test]
fn sessions_start_with_timeouts_and_a_pinned_search_path() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    drop(s);
    let mut c = conn::connect(&config(&url)).unwrap();
    let show = |c: &mut ::postgres::Client, what: &str| -> String {
        c.query_one(&format!("SHOW {what}"), &[])
            .unwrap()
            .get::<_, String>(0)
    };
    assert_eq!(show(&mut c, "lock_timeout"), "5s");
    assert_eq!(show(&mut c, "idle_in_transaction_session_timeout"), "15s");
    assert_eq!(show(&mut c, "statement_timeout"), "1min");
    assert_eq!(show(&mut c, "search_path"), "public, pg_catalog, pg_temp");
    // The URL's own options win over the defaults.
    let mut c = conn::connect(&config(&with_options(&url, &[("lock_timeout", "2s")]))).unwrap();
    assert_eq!(show(&mut c, "lock_timeout"), "2s");
    assert_eq!(show(&mut c, "statement_timeout"), "1min");
    // What the timeouts and a standby report is an outage (nothing was
    // written), said in words.
    let e = c
        .batch_execute("SET statement_timeout = '10ms'; SELECT pg_sleep(5)")
        .unwrap_err();
    let e = StoreError::from(e);
    assert!(
        matches!(&e, StoreError::Unavailable(m) if m.contains("statement_timeout")),
        "{e:?}"
    );
    c.batch_execute("RESET statement_timeout").unwrap();
    let e = c
        .batch_execute("BEGIN READ ONLY; INSERT INTO revoked_certs VALUES ('x', 'y', 0)")
        .unwrap_err();
    let e = StoreError::from(e);
    assert!(
        matches!(&e, StoreError::Unavailable(m) if m.contains("read only")),
        "{e:?}"
    );
}

#[test]
fn a_writer_that_stops_while_holding_the_write_lock_delays_writes_only_for_a_while() {
    let base = PgCluster::shared().database();
    let name = db_name(&base).to_owned();
    // Short timeouts for the test (the URL can give them).
    let url = with_options(
        &base,
        &[
            ("lock_timeout", "200ms"),
            ("idle_in_transaction_session_timeout", "1s"),
        ],
    );
    let cfg = config(&url);
    let s = PgStore::open(&cfg, true, KeyRing::generate().unwrap()).unwrap();
    add_secret(&s, "db");
    // Someone holds the revision row's lock and does nothing more: a
    // write fails as Unavailable after lock_timeout instead of hanging.
    let mut holder = PgCluster::shared().superuser_on(&name);
    holder
        .batch_execute("BEGIN; UPDATE revision SET value = value WHERE id = 1")
        .unwrap();
    let err = s
        .rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("lock_timeout")),
        "{err:?}"
    );
    assert!(err.to_string().contains("nothing was written"), "{err}");
    // A timeout on a sound connection does not replace it: the pool does
    // not grow however many writes time out.
    for _ in 0..12 {
        let err = s
            .rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
            .unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
    let open: i64 = holder
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 \
             AND application_name = 'secretfs'",
            &[&name],
        )
        .unwrap()
        .get(0);
    assert!(open <= commit::POOL_SIZE as i64, "{open} connections");
    // Reads are not held up.
    assert_eq!(s.get_secret("db").unwrap().version_count, 1);
    holder.batch_execute("ROLLBACK").unwrap();
    // A session of the store's (a replica that died while writing) idle
    // in its transaction is ended by PostgreSQL, which frees the lock.
    let mut dead = conn::connect(&cfg).unwrap();
    dead.batch_execute("BEGIN; UPDATE revision SET value = value WHERE id = 1")
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match s.rotate_secret("db", 20, None, &entry("rotate"), &mut sealed) {
            Ok(r) => {
                assert_eq!(r.value.version_count, 2);
                break;
            }
            Err(StoreError::Unavailable(_)) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(dead.batch_execute("SELECT 1").is_err());
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(s.verify_audit().unwrap().broken, None);
}

#[test]
fn a_connection_lost_during_commit_is_an_unknown_outcome_not_an_outage() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    add_secret(&s, "db");
    // A deferred trigger (added behind the open store's back) ends the
    // session at COMMIT.
    let raw = raw_on(&url);
    raw(
        "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_terminate_backend(pg_backend_pid()); RETURN NULL; END $$",
    );
    raw(
        "CREATE CONSTRAINT TRIGGER die AFTER INSERT ON audit DEFERRABLE INITIALLY DEFERRED
         FOR EACH ROW EXECUTE FUNCTION die()",
    );
    let err = s
        .rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
        .unwrap_err();
    assert!(matches!(err, StoreError::OutcomeUnknown(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("may or may not have been made") && text.contains("secret versions"),
        "{text}"
    );
    let status = tonic::Status::from(crate::error::Error::from(err));
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("may or may not"), "{status:?}");
    raw("DROP TRIGGER die ON audit");
    s.rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
        .unwrap();
}

#[test]
fn a_trigger_added_after_start_gets_no_row_signed() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    add_secret(&s, "db");
    let raw = raw_on(&url);
    raw(
        "CREATE FUNCTION promote() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.admin := 1; RETURN NEW; END $$",
    );
    raw("CREATE TRIGGER promote BEFORE INSERT ON clients FOR EACH ROW EXECUTE FUNCTION promote()");
    raw(
        "CREATE FUNCTION open_up() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.mode := 511; RETURN NEW; END $$",
    );
    raw("CREATE TRIGGER open_up BEFORE UPDATE ON secrets FOR EACH ROW EXECUTE FUNCTION open_up()");
    raw(
        "CREATE FUNCTION rename() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.name := 'other'; RETURN NEW; END $$",
    );
    raw("CREATE TRIGGER rename BEFORE INSERT ON groups FOR EACH ROW EXECUTE FUNCTION rename()");
    let new = NewClient {
        name: "web".into(),
        admin: false,
        cert: None,
    };
    let err = s
        .create_client(&new, &conformance::entry("client.add"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("clients row")
            && err.contains("trigger")
            && err.contains("nothing was written"),
        "{err}"
    );
    let err = s
        .rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("secrets row") && err.contains("trigger"),
        "{err}"
    );
    let err = s
        .update_secret(
            "db",
            &SecretUpdate {
                description: Some("x".into()),
                ..Default::default()
            },
            &|_| Ok(()),
            &entry("update"),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("secrets row"), "{err}");
    let err = s
        .create_group("ops", "", &conformance::entry("group.add"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("groups row"), "{err}");
    raw("DROP TRIGGER promote ON clients; DROP TRIGGER open_up ON secrets; DROP TRIGGER rename ON groups");
    // Nothing was written; every row is as the server signed it.
    assert!(s.list_clients().unwrap().iter().all(|c| c.name != "web"));
    assert_eq!(s.get_secret("db").unwrap().version_count, 1);
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(broken(&s), None);
    s.rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
        .unwrap();
}

#[test]
fn truncate_is_refused_on_every_protected_table_and_the_audit() {
    let (s, url) = fresh(KeyRing::generate().unwrap());
    add_secret(&s, "db");
    let mut other = PgCluster::shared().superuser_on(db_name(&url));
    for table in [
        "meta",
        "clients",
        "client_certs",
        "groups",
        "group_clients",
        "group_secrets",
        "secrets",
        "audit",
        "audit_head",
        "row_set",
    ] {
        let err = other
            .batch_execute(&format!("TRUNCATE {table} CASCADE"))
            .unwrap_err();
        assert!(
            conn::describe(&err).contains("TRUNCATE of"),
            "{table}: {}",
            conn::describe(&err)
        );
    }
    assert_eq!(s.get_secret("db").unwrap().version_count, 1);
    assert_eq!(s.verify_rows().unwrap(), vec![]);
    assert_eq!(broken(&s), None);
}

/// Rotations from 8 threads (as the `pg-rotate` bench row's 8 in flight):
/// how many a second, and how many share a COMMIT. A measurement: `cargo
/// test --release -p secretfs-server --lib rotations_per_commit --
/// --ignored --nocapture`.
#[test]
#[ignore = "a measurement; run by hand"]
fn rotations_per_commit() {
    const THREADS: usize = 8;
    const EACH: usize = 250;
    let (s, _) = fresh(KeyRing::generate().unwrap());
    for i in 0..THREADS {
        add_secret(&s, &format!("r{i}"));
    }
    let commits = s.pool.commits();
    let start = std::time::Instant::now();
    std::thread::scope(|scope| {
        for i in 0..THREADS {
            let s = &s;
            scope.spawn(move || {
                for _ in 0..EACH {
                    s.rotate_secret(&format!("r{i}"), 20, None, &entry("rotate"), &mut sealed)
                        .unwrap();
                }
            });
        }
    });
    let took = start.elapsed();
    let n = THREADS * EACH;
    let commits = s.pool.commits() - commits;
    println!(
        "{n} rotations in {took:?}: {:.0}/s, {commits} commits ({:.1} rotations each)",
        n as f64 / took.as_secs_f64(),
        n as f64 / commits as f64
    );
}

/// A rotation reads its secret off the writer first; one made meanwhile
/// makes that read stale: the guarded write finds no row and writes
/// nothing, and the rotation is made again under the lock.
#[test]
fn a_rotation_from_a_stale_read_writes_nothing_and_is_made_again() {
    let (s, _) = fresh(KeyRing::generate().unwrap());
    add_secret(&s, "db");
    let keys = s.keys.get();
    let ck = Checker {
        keys: &keys,
        log: &s.bad_rows,
    };
    let seen = s.pool.read_one(|tx| secrets::seen(tx, &ck, "db")).unwrap();
    let between = s
        .rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
        .unwrap();
    assert_eq!(between.value.current_version, 2);
    let revision = s.revision().unwrap();
    let stale = s.pool.write(&keys, Write::Change, |tx| {
        secrets::rotate(
            tx,
            &ck,
            "db",
            20,
            None,
            &entry("rotate"),
            &mut sealed,
            Some(&seen),
        )
    });
    assert!(
        matches!(&stale, Err(e) if secrets::is_stale(e)),
        "{:?}",
        stale.map(|c| c.value.current_version)
    );
    // Nothing of it: no version 2 written twice, no revision, no entry.
    assert_eq!(s.revision().unwrap(), revision);
    assert_eq!(s.get_secret("db").unwrap().current_version, 2);
    // Through the store, the same race ends in a new version.
    let again = s
        .rotate_secret("db", 20, None, &entry("rotate"), &mut sealed)
        .unwrap();
    assert_eq!(again.value.current_version, 3);
    assert_eq!(again.value, s.get_secret("db").unwrap());
    assert_eq!(s.verify_audit().unwrap().broken, None);
}
