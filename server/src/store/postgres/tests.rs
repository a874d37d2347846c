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
    conformance::concurrent_writes(Arc::new(s));
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
    raw("CREATE FUNCTION hide() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN NEW.actor := 'alice'; RETURN NEW; END $$");
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
        ("CREATE TABLE stash (x INT)", "table \"stash\"", "DROP TABLE stash"),
        (
            "CREATE RULE keep AS ON DELETE TO audit DO INSTEAD NOTHING",
            "rule \"keep\"",
            "DROP RULE keep ON audit",
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
    assert_eq!(s.reseal_rows(10).unwrap(), 0, "nothing to do without a rekey");
    keys.replace(Keys {
        current: KeySet::new(2, MasterKey::from_hex(&new).unwrap()).into(),
        previous: Some(KeySet::new(1, MasterKey::from_hex(&old).unwrap()).into()),
        retired_audit: Default::default(),
    });
    assert_eq!(s.verify_rows().unwrap(), bad, "old MACs are good during a rekey");
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
        s.create_secret(&new, &conformance::entry("secret.create"), &mut |id, version| {
            let binding = Binding {
                secret_id: id,
                name,
                version,
            };
            Ok(ring.get().current.master().seal(binding, content).unwrap())
        })
        .unwrap();
    };
    for i in 0..6u8 {
        add(&format!("s{i}"), &[i; 5]);
    }
    assert_eq!(s.rewrap_keys(4).unwrap(), 0, "no rekey, nothing to do");
    assert_eq!(s.versions_not_opening(old.master()).unwrap(), vec![]);
    assert_eq!(s.versions_not_opening(new.master()).unwrap().len(), 6);
    ring.replace(Keys::of(new.at_epoch(2).into(), Some(old.at_epoch(1).into())));
    add("during", b"late");
    assert_eq!(s.rewrap_keys(4).unwrap(), 4);
    assert_eq!(s.versions_not_opening(new.master()).unwrap().len(), 2);
    assert_eq!(s.rewrap_keys(4).unwrap(), 3);
    assert_eq!(s.rewrap_keys(4).unwrap(), 0);
    assert_eq!(s.versions_not_opening(new.master()).unwrap(), vec![]);
    assert_eq!(s.versions_not_opening(old.master()).unwrap().len(), 7);
}
