//! Several replicas on one database: each test holds two or three
//! [`PgStore`]s on the same PostgreSQL database (what each replica's server
//! holds) with the same master key, and checks what one replica sees of
//! another's changes, of a lost listener, of concurrent writers and of an
//! outage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use secretfs_pgtest::PgCluster;
use tokio::sync::broadcast;

use super::tests::{next, until};
use super::APPLICATION_NAME;
use crate::keys::KeyRing;
use crate::store::conformance::entry;
use crate::store::postgres::{PgConfig, PgStore};
use crate::store::*;

/// `n` replicas on a fresh database of `pg`: the first made it.
fn replicas(pg: &PgCluster, n: usize) -> (String, Vec<Arc<PgStore>>) {
    replicas_at(pg, &pg.database(), n)
}

/// `n` replicas on the database at `url` (of `pg`).
fn replicas_at(pg: &PgCluster, url: &str, n: usize) -> (String, Vec<Arc<PgStore>>) {
    let base = url.split('?').next().unwrap();
    let name = base.rsplit('/').next().unwrap().to_string();
    let keys = KeyRing::generate().unwrap();
    let cfg = PgConfig::parse(url, None).unwrap();
    let stores: Vec<PgStore> = (0..n)
        .map(|i| PgStore::open(&cfg, i == 0, keys.clone()).unwrap())
        .collect();
    assert_eq!(listeners(pg, &name), n as i64, "one listener per replica");
    (name, stores.into_iter().map(Arc::new).collect())
}

fn listeners(pg: &PgCluster, db: &str) -> i64 {
    pg.superuser()
        .query_one(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = $2",
            &[&db, &APPLICATION_NAME],
        )
        .unwrap()
        .get(0)
}

fn sealed() -> Sealed {
    Sealed {
        wrapped_key: vec![1; 60],
        ciphertext: vec![2; 40],
    }
}

fn add(store: &PgStore, name: &str) -> Result<Committed<SecretRecord>> {
    store.create_secret(
        &NewSecret {
            name: name.into(),
            size: 40,
            ..Default::default()
        },
        &AuditEntry {
            secret: Some(name.into()),
            ..entry("secret.create")
        },
        &mut |_, _| Ok(sealed()),
    )
}

fn rotate(store: &PgStore, name: &str) -> Result<Committed<SecretRecord>> {
    store.rotate_secret(
        name,
        40,
        None,
        &AuditEntry {
            secret: Some(name.into()),
            ..entry("secret.rotate")
        },
        &mut |_, _| Ok(sealed()),
    )
}

/// Waits until every revision up to `last` was delivered on `rx`, one by
/// one or covered by a Resync; returns whether a Resync came.
fn covered_up_to(rx: &mut broadcast::Receiver<Change>, from: u64, last: u64) -> bool {
    let mut covered = from;
    let mut resynced = false;
    while covered < last {
        match next(rx) {
            Change::Resync { revision } => {
                resynced = true;
                covered = covered.max(revision);
            }
            // Delivered late, from before `from` (the subscriber came
            // after the change, the notification after the subscriber).
            c if c.revision() <= from => {}
            c => {
                assert_eq!(c.revision(), covered + 1, "out of order: {c:?}");
                covered = c.revision();
            }
        }
    }
    resynced
}

#[test]
fn a_change_through_one_replica_reaches_the_others_at_its_revision() {
    let (_, stores) = replicas(PgCluster::shared(), 3);
    let (a, b, c) = (&stores[0], &stores[1], &stores[2]);
    let mut on_a = a.feed().subscribe();
    let mut on_b = b.feed().subscribe();
    let mut on_c = c.feed().subscribe();
    let made = add(a, "db/pw").unwrap();
    let want = Change::Secret {
        id: made.value.id,
        revision: made.revision,
    };
    assert_eq!(next(&mut on_b), want);
    assert_eq!(next(&mut on_c), want);
    // A hears its own change too (unpublished here: the domain publishes).
    assert_eq!(next(&mut on_a), want);
    // And back the other way, one revision on.
    let removed = b
        .delete_secret(
            "db/pw",
            &AuditEntry {
                secret: Some("db/pw".into()),
                ..entry("secret.delete")
            },
        )
        .unwrap();
    assert_eq!(removed.revision, made.revision + 1);
    assert_eq!(
        next(&mut on_a),
        Change::SecretDeleted {
            id: made.value.id,
            revision: removed.revision
        }
    );
    assert_eq!(a.revision().unwrap(), removed.revision);
}

#[test]
fn replicas_over_verify_full_tls_hear_each_other() {
    let files = secretfs_pgtest::TlsFiles::new(&["localhost", "127.0.0.1"]);
    let pg = PgCluster::start(files.options());
    let url = format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.database(),
        files.ca.display()
    );
    let (db, stores) = replicas_at(&pg, &url, 2);
    let mut on_b = stores[1].feed().subscribe();
    let made = add(&stores[0], "db/pw").unwrap();
    assert_eq!(
        next(&mut on_b),
        Change::Secret {
            id: made.value.id,
            revision: made.revision
        }
    );
    // Every connection of both replicas, listeners included, is TLS.
    let (all, clear): (i64, i64) = {
        let row = pg
            .superuser()
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE NOT s.ssl) \
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                 WHERE a.datname = $1 AND a.backend_type = 'client backend'",
                &[&db],
            )
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert!(all >= 2, "{all} connections");
    assert_eq!(clear, 0, "{clear} of {all} connections in clear");
}

#[test]
fn a_replica_whose_listener_was_cut_catches_up_and_reconnects() {
    let pg = PgCluster::shared();
    let (db, stores) = replicas(pg, 2);
    let (a, b) = (&stores[0], &stores[1]);
    let from = a.revision().unwrap();
    let mut on_b = b.feed().subscribe();
    let cut: i64 = pg
        .superuser()
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = $2",
            &[&db, &APPLICATION_NAME],
        )
        .unwrap()
        .get(0);
    assert_eq!(cut, 2, "one listener per replica");
    let mut last = 0;
    for i in 0..5 {
        last = add(a, &format!("s{i}")).unwrap().revision;
    }
    // Every change reaches B, or a Resync covering it (the reconnection
    // always sends one).
    covered_up_to(&mut on_b, from, last);
    until("B's listener connected again", || b.feed().connected());
    let made = add(a, "after").unwrap();
    loop {
        match next(&mut on_b) {
            Change::Secret { id, revision } if revision == made.revision => {
                assert_eq!(id, made.value.id);
                break;
            }
            Change::Resync { revision } if revision >= made.revision => break,
            _ => {}
        }
    }
}

#[test]
fn concurrent_rotations_through_two_replicas_get_distinct_versions() {
    let (_, stores) = replicas(PgCluster::shared(), 2);
    add(&stores[0], "shared").unwrap();
    const EACH: usize = 20;
    let runs: Vec<_> = stores
        .iter()
        .map(|s| {
            let s = s.clone();
            std::thread::spawn(move || {
                (0..EACH)
                    .map(|_| {
                        let c = rotate(&s, "shared").unwrap();
                        (c.value.current_version, c.revision)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut versions = Vec::new();
    let mut revisions = Vec::new();
    for run in runs {
        for (v, r) in run.join().unwrap() {
            versions.push(v);
            revisions.push(r);
        }
    }
    versions.sort();
    revisions.sort();
    revisions.dedup();
    assert_eq!(versions, (2..=(2 * EACH as u64 + 1)).collect::<Vec<_>>());
    assert_eq!(revisions.len(), 2 * EACH, "two changes at one revision");
    let listed = stores[1].list_versions("shared").unwrap();
    assert_eq!(listed.len(), 2 * EACH + 1);
    assert_eq!(
        stores[1].get_secret("shared").unwrap().current_version,
        2 * EACH as u64 + 1
    );
}

#[test]
fn an_outage_refuses_writes_cleanly_and_everything_recovers_by_itself() {
    let pg = PgCluster::start(Default::default());
    let (_, stores) = replicas(&pg, 2);
    let (a, b) = (&stores[0], &stores[1]);
    add(a, "before").unwrap();
    let revision = a.revision().unwrap();
    let mut on_b = b.feed().subscribe();
    pg.stop();
    match add(a, "during") {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("a write during the outage: {other:?}"),
    }
    until("B's listener noticed", || !b.feed().connected());
    pg.start_again();
    // Reads and writes work again through the same stores.
    until("A reads again", || a.revision().is_ok());
    assert_eq!(a.revision().unwrap(), revision, "the failed write wrote");
    let names: Vec<String> = a
        .list_secrets()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["before"]);
    let made = add(a, "after").unwrap();
    covered_up_to(&mut on_b, revision, made.revision);
    until("B's listener is back", || b.feed().connected());
    assert_eq!(b.get_secret("after").unwrap().id, made.value.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_removed_on_one_replica_is_refused_on_another() {
    use crate::domain::{Action, Domain, Peer, Settings};
    use crate::identity::{IdentitySource, Issuer, PeerIdentity};
    // (Opening a store blocks: off the async threads, as the server does.)
    let (_, stores) = tokio::task::spawn_blocking(|| replicas(PgCluster::shared(), 2))
        .await
        .unwrap();
    let (a, b) = (stores[0].clone(), stores[1].clone());
    let (ca, _) = crate::pki::Ca::generate("test.example").unwrap();
    let dyn_b: Arc<dyn Store> = b;
    let (domain_b, _thread) = Domain::start(
        dyn_b,
        KeyRing::generate().unwrap(),
        ca,
        Settings {
            trust_domain: "test.example".into(),
            max_secret_size: 1024,
        },
    );
    let created = {
        let a = a.clone();
        tokio::task::spawn_blocking(move || {
            a.create_client(
                &NewClient {
                    name: "web".into(),
                    admin: false,
                    cert: Some(("serial-web".into(), i64::MAX)),
                },
                &Action::ClientCreate.by("replica-a"),
            )
        })
        .await
        .unwrap()
    };
    created.unwrap();
    let peer = || Peer {
        identity: PeerIdentity {
            name: "web".into(),
            serial: "serial-web".into(),
            source: IdentitySource::Spiffe,
            issuer: Issuer::BuiltIn,
            not_before: 0,
            not_after: i64::MAX,
        },
        remote: "127.0.0.1:1".parse().ok(),
    };
    // Authenticated on B, and cached there now.
    domain_b.authenticate(peer()).await.unwrap();
    let removed = {
        let a = a.clone();
        tokio::task::spawn_blocking(move || {
            a.remove_client("web", &Action::ClientRemove.by("replica-a"))
        })
        .await
        .unwrap()
    };
    removed.unwrap();
    // Only the database's notification can tell B.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = domain_b.authenticate(peer()).await;
        if matches!(r, Err(crate::error::Error::Unauthenticated(_))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still authenticated on B 20 s after A removed the client: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The stores are dropped here, on an async thread, as a server's are
    // at shutdown.
}

/// A rekey must know whether other replicas serve the database: each
/// replica's listener counts, and a store does not count itself.
#[test]
fn each_replica_sees_the_others_but_not_itself() {
    let pg = PgCluster::shared();
    let (_, one) = replicas(pg, 1);
    assert_eq!(one[0].other_replicas().unwrap(), Vec::<String>::new());
    let (_, three) = replicas(pg, 3);
    for s in &three {
        let others = s.other_replicas().unwrap();
        assert_eq!(others.len(), 2, "{others:?}");
        assert!(others.iter().all(|o| o == "127.0.0.1"), "{others:?}");
    }
}
