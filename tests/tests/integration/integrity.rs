//! Authenticated rows: the database edited directly, without the master
//! key (the server stopped, the file changed with python's sqlite3, the
//! server started again). Every edit of a protected column or table must
//! be detected: not served, logged, audited and listed by `secretfs server
//! verify`. Deleting a grant only takes access away; a database made
//! before row MACs is adopted and serves as before. A row put back with
//! its old MAC (replay), deleted or added changes the row set: the server
//! refuses to start until an operator accepts the rows after review.

use std::path::Path;

use crate::common::*;

/// Runs `sql` (statements separated by ';') on the database file.
/// Puts back the master key check a database from before the upgrade
/// holds (v1), sealed with the test server's master key.
fn put_pre_upgrade_key_check(s: &TestServer) {
    let key = secretfs_server::state_dir::load_master_key(&s.state.join("master.key")).unwrap();
    let v1 = secretfs_server::keys::pre_upgrade_key_check(&key).unwrap();
    let hex: String = v1.iter().map(|b| format!("{b:02x}")).collect();
    edit_db(
        &s.db(),
        &format!("UPDATE meta SET value = X'{hex}' WHERE key = 'master_key_check';"),
    );
}

fn edit_db(db: &Path, sql: &str) {
    let out = python()
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1])\n\
             c.executescript(sys.argv[2])\n\
             c.commit()\n",
        ])
        .arg(db)
        .arg(sql)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "editing the database failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the server and `server verify` say when the row set does not agree.
const PUT_BACK: &str = "rows were put back, deleted or added without the key";

/// `server run` on the stopped server's state: must refuse to start,
/// naming the row set.
fn start_refused(s: &TestServer) -> Run {
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "run", "--state-dir"])
        .arg(&s.state)
        .args(["--listen", "127.0.0.1:0"]);
    let run = run_cmd(cmd, None).fails(1, PUT_BACK);
    assert!(run.stderr.contains("Nothing was changed"), "{}", run.stderr);
    assert!(run.stderr.contains("--accept"), "{}", run.stderr);
    run
}

/// `server verify --accept --yes` (the server stopped).
fn accept(s: &TestServer) -> Run {
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "verify", "--accept", "--yes"])
        .env("SECRETFS_STATE_DIR", &s.state);
    run_cmd(cmd, None)
}

/// `server verify -o json`: (exit code, the row set's finding).
fn verify_set(s: &TestServer) -> (i32, Option<String>) {
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "verify", "-o", "json"])
        .env("SECRETFS_STATE_DIR", &s.state);
    let run = run_cmd(cmd, None);
    let set = run.json()["row_set"].as_str().map(str::to_owned);
    (run.code, set)
}

/// `server verify` beside the server, as JSON: (exit code, bad rows as
/// "table key", stderr).
fn verify(s: &TestServer) -> (i32, Vec<String>, String) {
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "verify", "-o", "json"])
        .env("SECRETFS_STATE_DIR", &s.state);
    let run = run_cmd(cmd, None);
    let json = run.json();
    let rows = json["bad_rows"]
        .as_array()
        .expect("bad_rows")
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["table"].as_str().unwrap(),
                r["key"].as_str().unwrap()
            )
        })
        .collect();
    (run.code, rows, run.stderr)
}

/// Re-signs the `secrets` row `name` as the server would (HKDF-SHA256 row
/// key from `master.key`, HMAC-SHA256 over the length-prefixed fields of
/// `store/integrity.rs`): a row edited by someone who holds the master
/// key, such as an older server. Written independently of the server's
/// code, so it also pins the MAC's format.
pub fn resign_secret(s: &TestServer, name: &str) {
    let out = python()
        .args([
            "-c",
            r#"
import hashlib, hmac, sqlite3, struct, sys
db, key_file, name = sys.argv[1:4]
master = bytes.fromhex(open(key_file).read().strip())
prk = hmac.new(b"secretfs/v1 hkdf", master, hashlib.sha256).digest()
row_key = hmac.new(prk, b"secretfs/v1 row mac" + b"\x01", hashlib.sha256).digest()
def field(b): return struct.pack(">Q", len(b)) + b
def u64(v): return field(struct.pack(">Q", v))
def i64(v): return field(struct.pack(">q", v))
def opt(v): return field(b"\x00") if v is None else field(b"\x01" + struct.pack(">q", v))
c = sqlite3.connect(db)
r = c.execute("SELECT id, name, description, labels, mode, owner, grp, expires_at, current_version, "
              "version_count, created_at, updated_at FROM secrets WHERE name = ?", (name,)).fetchone()
msg = (field(b"secrets") + u64(r[0]) + field(r[1].encode()) + field(r[2].encode()) + field(r[3].encode())
       + u64(r[4]) + opt(r[5]) + opt(r[6]) + opt(r[7]) + u64(r[8]) + u64(r[9]) + i64(r[10]) + i64(r[11]))
c.execute("UPDATE secrets SET mac = ? WHERE id = ?", (hmac.new(row_key, msg, hashlib.sha256).digest(), r[0]))
c.commit()
"#,
        ])
        .arg(s.db())
        .arg(s.state.join("master.key"))
        .arg(name)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "re-signing failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn id_of(s: &TestServer, table: &str, name: &str) -> i64 {
    let out = python()
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1])\n\
             print(c.execute(f'SELECT id FROM {sys.argv[2]} WHERE name = ?', (sys.argv[3],)).fetchone()[0])\n",
        ])
        .arg(s.db())
        .args([table, name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn every_protected_column_edited_without_the_key_is_detected() {
    if crate::common::sqlite_only("edits every protected column in the SQLite file") {
        return;
    }
    let mut s = TestServer::start();
    // One secret per column to edit, all granted to `app` through `g`;
    // `ok` is never touched (the control).
    let edited = ["rolled", "mode", "owner", "grp", "expires", "named"];
    for name in edited.iter().chain(&["ok"]) {
        s.add_secret(name, format!("{name}-1").as_bytes());
    }
    s.cli_in(&["secret", "rotate", "rolled"], b"rolled-2").ok();
    s.add_secret("hidden", b"hidden-1");
    s.add_secret("hidden2", b"hidden2-1");
    let app = s.add_client("app");
    let escalate = s.add_client("escalate");
    let toggled = s.add_client("toggled");
    let mut names: Vec<&str> = edited.to_vec();
    names.push("ok");
    s.grant("g", &["app"], &names);
    s.grant("h", &[], &["hidden"]);
    s.grant("h2", &[], &["hidden2"]);
    // `app` may not read hidden*, and may not act as an admin.
    s.cli_as(&app, &["read", "hidden"], None).fails(1, "hidden");
    s.cli_as(&escalate, &["secret", "list"], None)
        .fails(1, "not an admin");
    assert_eq!(verify(&s).0, 0);

    // A certificate from the state's CA for `app` that the server never
    // issued (as one with the CA key but not the master key could make).
    let now = time::OffsetDateTime::now_utc();
    let forged = s.cert_from_state_ca(
        "app",
        &s.tmp.path().join("forged"),
        now - time::Duration::minutes(1),
        now + time::Duration::days(1),
    );
    s.cli_as(&forged, &["whoami"], None).fails(1, "");
    let forged_serial = cert_info(&forged.cert).serial;

    let (app_id, g, h, h2, hidden2) = (
        id_of(&s, "clients", "app"),
        id_of(&s, "groups", "g"),
        id_of(&s, "groups", "h"),
        id_of(&s, "groups", "h2"),
        id_of(&s, "secrets", "hidden2"),
    );
    s.stop();
    edit_db(
        &s.db(),
        &format!(
            "UPDATE clients SET admin = 1 WHERE name = 'escalate';
             UPDATE clients SET enabled = 0 WHERE name = 'toggled';
             INSERT INTO client_certs (client_id, serial, not_after, issued_at)
                  VALUES ({app_id}, '{forged_serial}', 4102444800, 0);
             INSERT INTO group_clients (group_id, client_id) VALUES ({h}, {app_id});
             INSERT INTO group_secrets (group_id, secret_id) VALUES ({g}, {hidden2});
             UPDATE secrets SET current_version = 1 WHERE name = 'rolled';
             UPDATE secrets SET mode = 420 WHERE name = 'mode';
             UPDATE secrets SET owner = 0 WHERE name = 'owner';
             UPDATE secrets SET grp = 0 WHERE name = 'grp';
             UPDATE secrets SET expires_at = 4102444800 WHERE name = 'expires';
             UPDATE secrets SET name = 'renamed' WHERE name = 'named';"
        ),
    );
    let _ = h2;
    // Rows were added: the row set no longer agrees, and the server will
    // not start until the operator takes the rows as they are; the bad
    // rows stay bad.
    start_refused(&s);
    accept(&s).fails(1, "bad rows remain");
    s.restart_on("127.0.0.1:0");

    // clients.admin: the client is unknown, so certainly no admin.
    s.cli_as(&escalate, &["secret", "list"], None)
        .fails(1, "not registered");
    // clients.enabled: unknown too.
    s.cli_as(&toggled, &["whoami"], None)
        .fails(1, "not registered");
    // client_certs: a certificate bound without the key is not issued.
    s.cli_as(&forged, &["whoami"], None).fails(1, "");
    // group_clients / group_secrets: the added paths grant nothing.
    s.cli_as(&app, &["read", "hidden"], None).fails(1, "hidden");
    s.cli_as(&app, &["read", "hidden2"], None)
        .fails(1, "hidden2");
    // secrets: each edited row is not served; the old version is not
    // served after a rollback of current_version.
    for name in [
        "rolled", "mode", "owner", "grp", "expires", "renamed", "named",
    ] {
        let r = s.cli_as(&app, &["read", name], None);
        assert_ne!(r.code, 0, "{name} was served: {r:?}");
        assert!(!r.stdout.contains("-1"), "{name}: {r:?}");
    }
    assert_eq!(s.cli_as(&app, &["read", "ok"], None).ok().stdout, "ok-1");
    // The mount shows the same: only the untouched secret.
    require_fuse();
    let m = s.mount_as(&app, &[]);
    assert_eq!(std::fs::read(m.file("ok")).unwrap(), b"ok-1");
    let mut shown: Vec<String> = std::fs::read_dir(m.file(""))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    shown.sort();
    assert_eq!(shown, ["ok"], "the mount shows tampered secrets");
    drop(m);
    let mine = s.cli_as(&app, &["whoami", "-o", "json"], None).ok().json();
    let access: Vec<&str> = mine["access"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["secret"].as_str().unwrap())
        .collect();
    assert_eq!(access, ["ok"], "{mine}");
    let listed = s.cli(&["secret", "list", "-o", "json"]).ok().json();
    let listed: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["hidden", "hidden2", "ok"], "not listed either");

    // The same edit made with the master key (re-signed) is served: the
    // MAC is what decides, and its format is the documented one.
    s.cli_as(&app, &["read", "mode"], None).fails(1, "mode");
    resign_secret(&s, "mode");
    assert_eq!(
        s.cli_as(&app, &["read", "mode"], None).ok().stdout,
        "mode-1"
    );
    edit_db(&s.db(), "UPDATE secrets SET mode = 511 WHERE name = 'mode'");

    // Listed by `server verify` (beside the running server), exit 1.
    let (code, bad, stderr) = verify(&s);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("Restore the database from a backup"),
        "{stderr}"
    );
    let secret = |name: &str| format!("secrets id={}", id_of(&s, "secrets", name));
    let mut expected = vec![
        format!("clients id={}", id_of(&s, "clients", "escalate")),
        format!("clients id={}", id_of(&s, "clients", "toggled")),
        format!("client_certs client_id={app_id} serial={forged_serial}"),
        format!("group_clients group_id={h} client_id={app_id}"),
        format!("group_secrets group_id={g} secret_id={hidden2}"),
    ];
    for name in ["rolled", "mode", "owner", "grp", "expires", "renamed"] {
        expected.push(secret(name));
    }
    for row in &expected {
        assert!(bad.contains(row), "verify did not list {row}: {bad:?}");
    }
    assert_eq!(bad.len(), expected.len(), "{bad:?}");

    // Logged (error level, no content) and audited once each.
    let log = s.log();
    let events = s.audit_events("integrity.bad_row", &[]);
    for row in &expected {
        let (table, key) = row.split_once(' ').unwrap();
        assert!(
            log.lines()
                .any(|l| l.contains("ERROR") && l.contains(table) && l.contains(key)),
            "{row} not logged:\n{log}"
        );
        let audited: Vec<_> = events
            .iter()
            .filter(|e| {
                e["detail"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{table} row {key}:"))
            })
            .collect();
        assert_eq!(audited.len(), 1, "{row}: {events:#?}");
        assert_eq!(audited[0]["actor"], "store");
        assert_eq!(audited[0]["allowed"], false);
    }
    assert!(!log.contains("rolled-1") && !log.contains("rolled-2"));
}

#[test]
fn deleting_a_grant_only_takes_access_away() {
    if crate::common::sqlite_only("deletes a grant row from the SQLite file") {
        return;
    }
    let (mut s, app) = TestServer::start_for_app(&[("db", "one"), ("other", "two")]);
    assert_eq!(s.cli_as(&app, &["read", "db"], None).ok().stdout, "one");
    let db = id_of(&s, "secrets", "db");
    s.stop();
    edit_db(
        &s.db(),
        &format!("DELETE FROM group_secrets WHERE secret_id = {db}"),
    );
    // No bad row, but a change made without the key: the row set says so
    // (a deletion cannot be told from a replay or an addition).
    let (code, bad, stderr) = verify(&s);
    assert_eq!((code, bad.len()), (1, 0), "{bad:?} {stderr}");
    assert!(stderr.contains(PUT_BACK), "{stderr}");
    start_refused(&s);
    accept(&s).ok();
    s.restart_on("127.0.0.1:0");
    s.cli_as(&app, &["read", "db"], None).fails(1, "db");
    assert_eq!(s.cli_as(&app, &["read", "other"], None).ok().stdout, "two");
    let (code, bad, stderr) = verify(&s);
    assert_eq!((code, bad.len()), (0, 0), "{bad:?} {stderr}");
    assert!(s.audit_events("integrity.bad_row", &[]).is_empty());
    assert_eq!(s.audit_events("integrity.accept", &[]).len(), 1);
}

/// Copies `table`'s rows matching `filter` into `copy` (an old copy of the
/// database, kept by someone who can write it), in a file beside it (a
/// table of its own in the database would be refused at start).
fn keep_copy(s: &TestServer, table: &str, copy: &str, filter: &str) {
    edit_db(
        &s.db(),
        &format!(
            "{} CREATE TABLE old.{copy} AS SELECT * FROM {table} WHERE {filter};",
            attach_copy(s)
        ),
    );
}

/// SQL that attaches the copies `keep_copy` made as `old`.
fn attach_copy(s: &TestServer) -> String {
    format!(
        "ATTACH DATABASE '{}' AS old;",
        s.state.join("old-copy.db").display()
    )
}

#[test]
fn a_row_put_back_with_its_old_mac_is_detected_and_refused_until_accepted() {
    if crate::common::sqlite_only("puts rows back by editing the SQLite file") {
        return;
    }
    let (mut s, app) = TestServer::start_for_app(&[("db", "one")]);
    keep_copy(&s, "secrets", "saved_s", "name = 'db'");
    s.cli_in(&["secret", "rotate", "db"], b"two").ok();
    let app_id = id_of(&s, "clients", "app");
    keep_copy(
        &s,
        "group_clients",
        "saved_gc",
        &format!("client_id = {app_id}"),
    );
    // Accepting needs the server stopped (it keeps its own view).
    accept(&s).fails(1, "in use");
    // The client taken out of its group: it reads nothing.
    s.cli(&["group", "remove-client", "app", "app"]).ok();
    s.cli_as(&app, &["read", "db"], None).fails(1, "db");
    s.stop();

    // The old membership row put back, its old MAC and all: the row is
    // good by itself, so only the row set tells.
    edit_db(
        &s.db(),
        &format!(
            "{} INSERT INTO group_clients SELECT * FROM old.saved_gc;",
            attach_copy(&s)
        ),
    );
    let run = start_refused(&s);
    assert!(run.stderr.contains("since revision"), "{}", run.stderr);
    let (code, bad, stderr) = verify(&s);
    assert_eq!((code, bad.len()), (1, 0), "{bad:?} {stderr}");
    assert!(
        stderr.contains(PUT_BACK) && stderr.contains("--accept"),
        "{stderr}"
    );
    let (_, set) = verify_set(&s);
    assert!(set.unwrap().contains(PUT_BACK));
    // Accepted after review: the server starts (and, as accepted, the
    // membership is the operator's now).
    let accepted = accept(&s).ok();
    assert!(accepted.stdout.contains("revision"), "{}", accepted.stdout);
    s.restart_on("127.0.0.1:0");
    assert_eq!(s.cli_as(&app, &["read", "db"], None).ok().stdout, "two");
    assert_eq!(verify(&s).0, 0);
    let events = s.audit_events("integrity.accept", &[]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["actor"], "local:verify");
    assert!(
        events[0]["detail"].as_str().unwrap().contains("revision"),
        "{events:?}"
    );

    // An old `secrets` row put back over the rotation: version 1 would be
    // current again.
    s.stop();
    edit_db(
        &s.db(),
        &format!(
            "{} UPDATE secrets SET current_version = (SELECT current_version FROM old.saved_s),
                version_count = (SELECT version_count FROM old.saved_s),
                updated_at = (SELECT updated_at FROM old.saved_s),
                mac = (SELECT mac FROM old.saved_s) WHERE name = 'db';",
            attach_copy(&s)
        ),
    );
    start_refused(&s);
    let (code, bad, stderr) = verify(&s);
    assert_eq!((code, bad.len()), (1, 0), "{bad:?} {stderr}");
    accept(&s).ok();
    s.restart_on("127.0.0.1:0");
    assert_eq!(verify(&s).0, 0);
    assert_eq!(s.audit_events("integrity.accept", &[]).len(), 2);
    // What was accepted is what is served: the operator's decision.
    assert_eq!(s.cli_as(&app, &["read", "db"], None).ok().stdout, "one");
}

#[test]
fn a_running_server_reports_a_row_set_mismatch_once_and_keeps_serving() {
    if crate::common::sqlite_only("edits the SQLite file behind the running server") {
        return;
    }
    let mut s = TestServer::start_with(&["--integrity-check-secs", "1"]);
    s.add_secret("db", b"one");
    s.add_secret("other", b"two");
    let app = s.add_client("app");
    s.grant("g", &["app"], &["db", "other"]);
    let db = id_of(&s, "secrets", "db");
    edit_db(
        &s.db(),
        &format!("DELETE FROM group_secrets WHERE secret_id = {db}"),
    );
    let found = eventually(std::time::Duration::from_secs(30), || {
        !s.audit_events("integrity.set_mismatch", &[]).is_empty()
    });
    assert!(found, "no integrity.set_mismatch audited\n{}", s.log());
    // Checked again (every second here): still audited once.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let events = s.audit_events("integrity.set_mismatch", &[]);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["actor"], "store");
    assert_eq!(events[0]["allowed"], false);
    assert!(events[0]["detail"].as_str().unwrap().contains(PUT_BACK));
    assert!(
        s.log()
            .lines()
            .any(|l| l.contains("ERROR") && l.contains(PUT_BACK)),
        "{}",
        s.log()
    );
    // Serving goes on.
    assert_eq!(s.cli_as(&app, &["read", "other"], None).ok().stdout, "two");
    s.stop();
    start_refused(&s);
}

#[test]
fn removing_a_revocation_readmits_nobody() {
    if crate::common::sqlite_only("deletes a revocation row from the SQLite file") {
        return;
    }
    let s = TestServer::start();
    let first = s.add_client("app");
    let old = copy_identity(&first, &s.tmp.path().join("old"));
    std::fs::remove_file(&first.cert).unwrap();
    std::fs::remove_file(&first.key).unwrap();
    s.cli_as(&old, &["whoami"], None).ok();
    s.cli(&["client", "remove", "app", "--yes"]).ok();
    let new = s.add_client("app");
    edit_db(&s.db(), "DELETE FROM revoked_certs");
    // The removed client's certificate is still refused: the new `app`
    // was never issued its serial.
    s.cli_as(&old, &["whoami"], None).fails(1, "");
    s.cli_as(&new, &["whoami"], None).ok();
    assert_eq!(verify(&s).0, 0);
}

#[test]
fn a_database_made_before_row_macs_is_adopted_and_serves_as_before() {
    if crate::common::sqlite_only(
        "builds a pre-row-MAC SQLite database (no PostgreSQL database predates row MACs)",
    ) {
        return;
    }
    let (mut s, app) = TestServer::start_for_app(&[("db", "one")]);
    s.stop();
    // What a database of schema 3 looks like: no mac columns, no
    // adoption record.
    edit_db(
        &s.db(),
        "DELETE FROM meta WHERE key = 'rows_authenticated';
         ALTER TABLE clients DROP COLUMN mac;
         ALTER TABLE client_certs DROP COLUMN mac;
         ALTER TABLE groups DROP COLUMN mac;
         ALTER TABLE group_clients DROP COLUMN mac;
         ALTER TABLE group_secrets DROP COLUMN mac;
         ALTER TABLE secrets DROP COLUMN mac;
         ALTER TABLE meta DROP COLUMN mac;
         DROP TABLE row_set;
         ALTER TABLE audit DROP COLUMN epoch;
         ALTER TABLE audit DROP COLUMN chain;
         DROP TABLE audit_head;
         PRAGMA user_version = 3;",
    );
    // Rewound like that but with the key check this version writes (v2),
    // it is an attack (edited rows adopted): refused, nothing changed.
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "run", "--state-dir"])
        .arg(&s.state)
        .args(["--listen", "127.0.0.1:0"]);
    let run = run_cmd(cmd, None).fails(1, "rewound without the key");
    assert!(run.stderr.contains("nothing was changed"), "{}", run.stderr);
    // A real schema-3 database holds the check from before the upgrade (v1).
    put_pre_upgrade_key_check(&s);
    // Only `server run` upgrades: verify and admin-cert refuse a database
    // that needs it (beside an older server they would upgrade under it),
    // naming `server run`, and change nothing.
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "verify", "--state-dir"]).arg(&s.state);
    run_cmd(cmd, None).fails(1, "needs the upgrade `secretfs server run`");
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "admin-cert", "--state-dir"])
        .arg(&s.state)
        .arg("--out")
        .arg(s.tmp.path().join("break-glass"));
    run_cmd(cmd, None).fails(1, "needs the upgrade `secretfs server run`");
    let version = python()
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA user_version').fetchone()[0])",
        ])
        .arg(s.db())
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), "3");
    s.restart_on("127.0.0.1:0");
    assert!(
        s.log().contains("signed once under the master key")
            && s.log().contains("taken as they are, once"),
        "{}",
        s.log()
    );
    assert_eq!(s.cli_as(&app, &["read", "db"], None).ok().stdout, "one");
    s.cli(&["secret", "list"]).ok();
    assert_eq!(verify(&s).0, 0);
    // Adopted once: a MAC NULLed afterwards is a bad row at the next
    // start, not signed again.
    s.stop();
    edit_db(&s.db(), "UPDATE secrets SET mac = NULL");
    // A MAC changed: the row set no longer agrees either.
    start_refused(&s);
    accept(&s).fails(1, "bad rows remain");
    s.restart_on("127.0.0.1:0");
    s.cli_as(&app, &["read", "db"], None).fails(1, "db");
    assert_eq!(verify(&s).0, 1);
}
