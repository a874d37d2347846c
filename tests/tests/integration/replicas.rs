//! Several servers on one PostgreSQL database, as an operator sets them up:
//! `server init --database URL` (the password never in argv), `server init
//! --join DIR` for each further replica, and the start-up errors a wrong
//! URL, password, port or database name give. Always on PostgreSQL (the
//! tests' own cluster, `secretfs_pgtest`), in the suite's postgres pass
//! only ([`postgres_pass_only`]).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{
    copy_dir, fresh_database, init_on, marker, postgres_pass_only, run_cmd, Run, TestServer,
};

const WHY: &str = "replicas need PostgreSQL, whatever SECRETFS_TEST_STORE says";

/// `server init --database URL` in `tmp/NAME`, with `extra` flags.
fn init(tmp: &Path, name: &str, url: &str, extra: &[&str]) -> (PathBuf, Run) {
    let state = tmp.join(name);
    let r = init_on(&state, Some(url), |c| {
        c.args(extra);
    });
    (state, r)
}

/// `server run` on `state` that must fail at start; its result.
fn run_fails(state: &Path, configure: impl FnOnce(&mut Command)) -> Run {
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "run", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state);
    configure(&mut cmd);
    let r = run_cmd(cmd, None);
    eprintln!("server run refused: {}", r.stderr.trim_end());
    assert_ne!(r.code, 0, "server run should refuse to start: {}", r.stderr);
    // The driver's bare "db error" is not an explanation.
    assert!(!r.stderr.contains("db error"), "{}", r.stderr);
    assert!(
        !r.stderr.contains(secretfs_pgtest::PASSWORD),
        "{}",
        r.stderr
    );
    r
}

/// A server of its own on a fresh database.
fn replica_a() -> (TestServer, String) {
    let tmp = tempfile::tempdir().unwrap();
    let url = fresh_database();
    let (state, r) = init(tmp.path(), "a", &url, &[]);
    let r = r.ok();
    assert!(
        r.stderr.contains("--database-password-file"),
        "{}",
        r.stderr
    );
    (
        TestServer::run_state(tmp, state, Some(url.clone()), &[], &[]),
        url,
    )
}

#[test]
fn init_and_run_on_postgres_record_the_database_without_its_password() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (a, url) = replica_a();
    assert_eq!(a.database.as_deref(), Some(url.as_str()));
    let record = std::fs::read_to_string(a.state.join("database.json")).unwrap();
    assert!(record.contains("postgres://"), "{record}");
    assert!(!record.contains(secretfs_pgtest::PASSWORD), "{record}");
    assert!(!a.state.join("secretfs.db").exists());
    let secret = marker("pg");
    a.add_secret("db/password", secret.as_bytes());
    let app = a.add_client("app");
    a.grant("app", &["app"], &["db/password"]);
    let r = a.cli_as(&app, &["read", "db/password"], None).ok();
    assert_eq!(r.stdout, secret);
    assert!(!a.log().contains(secretfs_pgtest::PASSWORD));
    // The commands beside the server find the database by the record.
    let mut verify = crate::common::secretfs();
    verify
        .args(["server", "verify", "--state-dir"])
        .arg(&a.state);
    let r = run_cmd(verify, None).ok();
    assert!(r.stdout.contains(&url), "{}", r.stdout);
    let out = a.tmp.path().join("break-glass");
    let mut admin_cert = crate::common::secretfs();
    admin_cert
        .args(["server", "admin-cert", "--name", "root2", "--state-dir"])
        .arg(&a.state)
        .arg("--out")
        .arg(&out);
    run_cmd(admin_cert, None).ok();
    let root2 = crate::common::Identity::in_dir(&out, "root2");
    a.cli_as(&root2, &["secret", "list"], None).ok();
}

#[test]
fn a_password_in_a_url_on_the_command_line_is_refused() {
    if postgres_pass_only(WHY) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let url = fresh_database().replacen("://secretfs@", "://secretfs:argv-pw-7d1c@", 1);
    let (state, r) = init(tmp.path(), "s", &url, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    for way in [
        "--database-password-file",
        "SECRETFS_DATABASE_PASSWORD",
        "SECRETFS_DATABASE_URL",
    ] {
        assert!(r.stderr.contains(way), "{}", r.stderr);
    }
    assert!(!r.stderr.contains("argv-pw-7d1c"), "{}", r.stderr);
    assert!(!state.exists());
    // A parameter name the driver decodes to `password` is one too.
    let encoded = format!("{}?pass%77ord=argv-pw-7d1c", fresh_database());
    let (_, r) = init(tmp.path(), "s", &encoded, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("--database-password-file"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("argv-pw-7d1c"), "{}", r.stderr);
    assert!(!state.exists());
    // The same URL from the environment is how it may be given.
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "init", "--state-dir"])
        .arg(&state)
        .env(
            "SECRETFS_DATABASE_URL",
            url.replacen("argv-pw-7d1c", secretfs_pgtest::PASSWORD, 1),
        )
        .env_remove("SECRETFS_DATABASE_PASSWORD");
    run_cmd(cmd, None).ok();
    assert!(state.join("database.json").exists());
}

#[test]
fn init_on_a_database_in_use_is_refused_without_join() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (a, url) = replica_a();
    let tmp = tempfile::tempdir().unwrap();
    let (state, r) = init(tmp.path(), "b", &url, &[]);
    assert_ne!(r.code, 0);
    eprintln!("init refused: {}", r.stderr.trim_end());
    assert!(r.stderr.contains("--join"), "{}", r.stderr);
    assert!(!state.exists());
    // A is untouched: its admin still works.
    a.cli(&["secret", "list"]).ok();
}

#[test]
fn a_joined_replica_serves_what_another_wrote() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (a, url) = replica_a();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("copy-of-a");
    copy_dir(&a.state, &copy);
    let (state, r) = init(
        tmp.path(),
        "b",
        &url,
        &["--join", copy.to_str().unwrap(), "--san", "127.0.0.1"],
    );
    let r = r.ok();
    // The copy holds the master key: init says to delete it, and how to
    // start (the password is not in the state directory).
    assert!(r.stderr.contains("delete the copy"), "{}", r.stderr);
    assert!(
        r.stderr.contains("server run --state-dir")
            && r.stderr.contains("--database-password-file"),
        "{}",
        r.stderr
    );
    // Shared: the CA and the admin identity; its own: the server's key.
    for shared in ["ca.pem", "ca.key", "admin.pem", "master.key"] {
        assert_eq!(
            std::fs::read(a.state.join(shared)).unwrap(),
            std::fs::read(state.join(shared)).unwrap(),
            "{shared}"
        );
    }
    assert_ne!(
        std::fs::read(a.state.join("server.key")).unwrap(),
        std::fs::read(state.join("server.key")).unwrap()
    );
    let b = TestServer::run_state(tmp, state, Some(url), &[], &[]);
    let secret = marker("replicated");
    a.add_secret("shared", secret.as_bytes());
    let app = a.add_client("app");
    a.grant("app", &["app"], &["shared"]);
    let r = b.cli_as(&app, &["read", "shared"], None).ok();
    assert_eq!(r.stdout, secret);
    // And the other way round.
    b.add_secret("from-b", b"bee");
    let list = a.cli(&["secret", "list"]).ok();
    assert!(list.stdout.contains("from-b"), "{}", list.stdout);
}

#[test]
fn join_with_another_master_key_is_refused_and_writes_nothing() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (a, url) = replica_a();
    let (other, _) = replica_a();
    let tmp = tempfile::tempdir().unwrap();
    let copy = tmp.path().join("copy-of-other");
    copy_dir(&other.state, &copy);
    let (state, r) = init(tmp.path(), "b", &url, &["--join", copy.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    eprintln!("init --join refused: {}", r.stderr.trim_end());
    assert!(r.stderr.contains("another master key"), "{}", r.stderr);
    assert!(!state.exists());
    let entries: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries.len(), 1, "left behind: {entries:?}");
    a.cli(&["secret", "list"]).ok();
}

#[test]
fn start_up_errors_name_the_problem() {
    if postgres_pass_only(WHY) {
        return;
    }
    let (mut a, url) = replica_a();
    a.stop();

    let r = run_fails(&a.state, |c| {
        c.env("SECRETFS_DATABASE_PASSWORD", "not-the-password");
    });
    assert!(r.stderr.contains("password"), "{}", r.stderr);

    let other = fresh_database();
    let r = run_fails(&a.state, |c| {
        c.args(["--database", &other]);
    });
    let db_name = |u: &str| format!("/{}", u.rsplit('/').next().unwrap());
    assert!(
        r.stderr.contains(&db_name(&other)) && r.stderr.contains(&db_name(&url)),
        "{}",
        r.stderr
    );

    let r = run_fails(&a.state, |c| {
        c.args(["--database", "postgres://secretfs@[not a host/x"]);
    });
    assert!(r.stderr.contains("not usable"), "{}", r.stderr);

    // A schema from a newer secretfs: refused, and left as it is.
    let name = url.rsplit('/').next().unwrap().to_owned();
    let cluster = secretfs_pgtest::PgCluster::shared();
    let bump = |by: i64| {
        cluster
            .superuser_on(&name)
            .execute(
                "UPDATE schema_version SET version = version + $1 WHERE id = 1",
                &[&by],
            )
            .unwrap();
    };
    bump(100);
    let r = run_fails(&a.state, |_| {});
    assert!(r.stderr.contains("newer"), "{}", r.stderr);
    bump(-100);
    a.restart_on("127.0.0.1:0");
    a.stop();

    // The database dropped behind the servers' back: an unknown name.
    cluster
        .superuser()
        .batch_execute(&format!("DROP DATABASE {name}"))
        .unwrap();
    let r = run_fails(&a.state, |_| {});
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);
}

#[test]
fn an_unreachable_database_is_a_clear_error_at_start() {
    if postgres_pass_only(WHY) {
        return;
    }
    let cluster = secretfs_pgtest::PgCluster::start(Default::default());
    let url = secretfs_pgtest::url_without_password(&cluster.database());
    let tmp = tempfile::tempdir().unwrap();
    let (state, r) = init(tmp.path(), "s", &url, &[]);
    r.ok();
    cluster.stop();
    let r = run_fails(&state, |_| {});
    let port = cluster.port().to_string();
    assert!(r.stderr.contains(&port), "{}", r.stderr);
    assert!(
        r.stderr
            .contains("cannot connect to the PostgreSQL database"),
        "{}",
        r.stderr
    );
}
