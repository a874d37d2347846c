//! The server and the operator CLI, end to end: the real binary, a real
//! mutual-TLS server on loopback, a real SQLite database.

use std::process::Command;

use crate::common::*;

#[test]
fn secret_lifecycle_add_rotate_versions_rollback_delete() {
    let s = TestServer::start();
    s.cli_in(
        &[
            "secret",
            "add",
            "db/password",
            "--mode",
            "0440",
            "--owner",
            "1000",
            "--group",
            "2000",
            "--description",
            "main database",
            "--label",
            "env=prod",
            "--expires",
            "2030-01-01T00:00:00Z",
        ],
        b"v1-content",
    )
    .ok();
    let d = s
        .cli(&["secret", "describe", "db/password", "--output", "json"])
        .ok()
        .json();
    assert_eq!(d["name"], "db/password");
    assert_eq!(d["mode"], "0440");
    assert_eq!(d["owner"], 1000);
    assert_eq!(d["group"], 2000);
    assert_eq!(d["labels"]["env"], "prod");
    assert_eq!(d["description"], "main database");
    assert_eq!(d["expires_at"], "2030-01-01T00:00:00Z");
    assert_eq!(d["size"], 10);
    assert_eq!(d["current_version"], 1);

    let file = s.tmp.path().join("v2");
    std::fs::write(&file, b"version-two").unwrap();
    s.cli(&[
        "secret",
        "rotate",
        "db/password",
        "--from-file",
        file.to_str().unwrap(),
    ])
    .ok();
    s.cli_in(&["secret", "rotate", "db/password"], b"3").ok();
    let v = s
        .cli(&["secret", "versions", "db/password", "-o", "json"])
        .ok()
        .json();
    let versions: Vec<(u64, bool, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["version"].as_u64().unwrap(),
                x["current"].as_bool().unwrap(),
                x["size"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(versions, [(1, false, 10), (2, false, 11), (3, true, 1)]);

    // A granted client sees each change.
    let app = s.add_client("app");
    s.grant("apps", &["app"], &["db/password"]);
    let read = |s: &TestServer| {
        s.cli_as(&app, &["read", "db/password"], None)
            .ok()
            .raw_stdout
    };
    assert_eq!(read(&s), b"3");
    s.cli(&["secret", "rollback", "db/password", "--to", "2"])
        .ok();
    assert_eq!(read(&s), b"version-two");
    let d = s
        .cli(&["secret", "describe", "db/password", "-o", "json"])
        .ok()
        .json();
    assert_eq!(
        (d["current_version"].as_u64(), d["version_count"].as_u64()),
        (Some(2), Some(3))
    );

    let list = s.cli(&["secret", "list", "-o", "json"]).ok().json();
    assert_eq!(list.as_array().unwrap().len(), 1);
    s.cli(&["secret", "delete", "db/password"]).ok();
    s.cli(&["secret", "describe", "db/password"])
        .fails(1, "not found");
    s.cli_as(&app, &["read", "db/password"], None)
        .fails(1, "may not read");
    assert!(s
        .cli(&["secret", "list", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
}

#[test]
fn grants_decide_who_reads_and_removal_locks_out_at_once() {
    let s = TestServer::start();
    s.add_secret("team/token", b"tok-123");
    s.add_secret("other/token", b"nope");
    let web = s.add_client("web");
    let batch = s.add_client("batch");
    s.grant("web", &["web"], &["team/token"]);

    assert_eq!(
        s.cli_as(&web, &["read", "team/token"], None)
            .ok()
            .raw_stdout,
        b"tok-123"
    );
    s.cli_as(&web, &["read", "other/token"], None)
        .fails(1, "may not read");
    s.cli_as(&batch, &["read", "team/token"], None)
        .fails(1, "may not read");
    // The admin holds no grant, so it cannot read content either.
    s.cli(&["read", "team/token"]).fails(1, "may not read");
    // Workloads cannot use the Admin service.
    s.cli_as(&web, &["secret", "list"], None)
        .fails(1, "not an admin");

    let who = s.cli_as(&web, &["whoami", "-o", "json"], None).ok().json();
    assert_eq!(who["client"], "web");
    assert_eq!(who["spiffe_id"], "spiffe://secretfs.local/client/web");
    assert_eq!(who["access"][0]["secret"], "team/token");
    let access = s.cli(&["access", "web", "-o", "json"]).ok().json();
    assert_eq!(access["access"][0]["groups"][0], "web");

    // A group change takes effect on the next call.
    s.cli(&["group", "add-client", "web", "batch"]).ok();
    assert_eq!(
        s.cli_as(&batch, &["read", "team/token"], None)
            .ok()
            .raw_stdout,
        b"tok-123"
    );
    s.cli(&["group", "remove-secret", "web", "team/token"]).ok();
    s.cli_as(&web, &["read", "team/token"], None)
        .fails(1, "may not read");

    // Removing a client locks it out at once, and re-adding the name does
    // not revive the old certificate.
    s.cli(&["client", "remove", "batch"]).ok();
    s.cli_as(&batch, &["whoami"], None)
        .fails(1, "that was removed");
    let again_dir = s.tmp.path().join("again");
    s.cli(&[
        "client",
        "add",
        "batch",
        "--out",
        again_dir.to_str().unwrap(),
    ])
    .ok();
    s.cli_as(&batch, &["whoami"], None)
        .fails(1, "refused for good");
    let fresh = Identity::in_dir(&again_dir, "batch");
    s.cli_as(&fresh, &["whoami"], None).ok();
}

#[test]
fn client_add_from_a_csr_made_elsewhere_and_key_files() {
    let s = TestServer::start();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    // The CSR asks for an admin-looking name; the server must ignore it.
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "admin");
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let dir = s.tmp.path().join("csr");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("req.csr"), csr).unwrap();
    let out = s
        .cli(&[
            "client",
            "add",
            "sidecar",
            "--csr",
            dir.join("req.csr").to_str().unwrap(),
            "--out",
            dir.to_str().unwrap(),
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(out["name"], "sidecar");
    assert!(
        !dir.join("sidecar.key").exists(),
        "no key is made when a CSR is given"
    );
    std::fs::write(dir.join("sidecar.key"), key.serialize_pem()).unwrap();
    let me = Identity::in_dir(&dir, "sidecar");
    let who = s.cli_as(&me, &["whoami", "-o", "json"], None).ok().json();
    assert_eq!(who["client"], "sidecar");
    assert_eq!(who["admin"], false);

    // Keys made by the CLI are private; an existing file is never overwritten.
    let web = s.add_client("web");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&web.key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out_dir = web.cert.parent().unwrap().to_str().unwrap().to_owned();
    s.cli(&["client", "add", "web", "--out", &out_dir])
        .fails(1, "already exists");
    let list = s.cli(&["client", "list", "-o", "json"]).ok().json();
    let names: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["admin", "sidecar", "web"]);
    // An admin client can be made and can use the Admin service.
    let ops_dir = s.tmp.path().join("ops");
    s.cli(&[
        "client",
        "add",
        "ops",
        "--admin",
        "--out",
        ops_dir.to_str().unwrap(),
    ])
    .ok();
    let ops = Identity::in_dir(&ops_dir, "ops");
    s.cli_as(&ops, &["secret", "list"], None).ok();
    // An admin cannot remove itself.
    s.cli_as(&ops, &["client", "remove", "ops"], None)
        .fails(1, "locked out");
}

#[test]
fn audit_records_changes_reads_and_denials_with_filters() {
    let s = TestServer::start();
    s.add_secret("a", b"x");
    s.add_secret("b", b"y");
    let web = s.add_client("web");
    s.grant("g", &["web"], &["a"]);
    s.cli_as(&web, &["read", "a"], None).ok();
    s.cli_as(&web, &["read", "b"], None)
        .fails(1, "may not read");
    s.cli_as(&web, &["secret", "list"], None)
        .fails(1, "not an admin");

    let events = s
        .cli(&["audit", "--client", "web", "-o", "json"])
        .ok()
        .json();
    let rows: Vec<(String, String, bool, serde_json::Value)> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["allowed"].as_bool().unwrap(),
                e["secret"].clone(),
            )
        })
        .collect();
    assert!(
        rows.contains(&(
            "admin".into(),
            "client.create".into(),
            true,
            serde_json::Value::Null
        )),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("web".into(), "secret.read".into(), true, "a".into())),
        "{rows:?}"
    );
    assert!(
        rows.contains(&("web".into(), "secret.read".into(), false, "b".into())),
        "{rows:?}"
    );
    assert!(
        rows.iter().any(|r| r.1 == "admin.secret.list" && !r.2),
        "{rows:?}"
    );

    let about_a = s.cli(&["audit", "--secret", "a", "-o", "json"]).ok().json();
    let actions: Vec<_> = about_a
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        actions,
        ["secret.create", "group.add-secret", "secret.read"]
    );
    let read = &about_a.as_array().unwrap()[2];
    assert_eq!(read["version"], 1);
    assert!(s
        .cli(&["audit", "--since", "2099-01-01T00:00:00Z", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    assert!(!s
        .cli(&["audit", "--since", "1h", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .is_empty());
    let text = s.cli(&["audit", "--secret", "b"]).ok().stdout;
    assert!(text.contains("DENIED"), "{text}");
}

#[test]
fn no_plaintext_in_database_wal_or_logs() {
    let mut s = TestServer::start();
    let first = marker("first");
    let second = marker("second");
    s.add_secret("leak/check", first.as_bytes());
    s.cli_in(&["secret", "rotate", "leak/check"], second.as_bytes())
        .ok();
    let web = s.add_client("web");
    s.grant("g", &["web"], &["leak/check"]);
    assert_eq!(
        s.cli_as(&web, &["read", "leak/check"], None).ok().stdout,
        second
    );
    // Scan while running (the WAL holds the recent writes) and after a stop.
    let scan = |s: &TestServer, when: &str| {
        for p in database_files(s) {
            let bytes = read_all(&p);
            for m in [&first, &second] {
                assert!(
                    !contains(&bytes, m.as_bytes()),
                    "plaintext in {} ({when})",
                    p.display()
                );
            }
        }
        for m in [&first, &second] {
            assert!(
                !s.log().contains(m.as_str()),
                "plaintext in the server log ({when})"
            );
        }
    };
    let wal = match &s.database {
        None => std::path::PathBuf::from(format!("{}-wal", s.db().display())),
        Some(_) => secretfs_pgtest::PgCluster::shared()
            .dir()
            .join("data/pg_wal"),
    };
    let wal_bytes: usize = database_files(&s)
        .iter()
        .filter(|p| p.starts_with(&wal))
        .map(|p| read_all(p).len())
        .sum();
    assert!(wal_bytes > 0, "WAL in use");
    scan(&s, "running");
    assert_eq!(s.stop(), 0);
    scan(&s, "stopped");
}

/// The files that hold `s`'s database: the SQLite file, its WAL and
/// journal; on PostgreSQL the test cluster's files of that database, its
/// WAL (pg_wal) and its log.
fn database_files(s: &TestServer) -> Vec<std::path::PathBuf> {
    let Some(url) = &s.database else {
        return ["", "-wal", "-shm", "-journal"]
            .iter()
            .map(|suffix| std::path::PathBuf::from(format!("{}{suffix}", s.db().display())))
            .collect();
    };
    let cluster = secretfs_pgtest::PgCluster::shared();
    let name = url.rsplit('/').next().unwrap();
    let oid: u32 = cluster
        .superuser()
        .query_one("SELECT oid FROM pg_database WHERE datname = $1", &[&name])
        .unwrap()
        .get(0);
    let data = cluster.dir().join("data");
    let mut files = vec![cluster.dir().join("postgres.log")];
    let mut dirs = vec![data.join("pg_wal"), data.join(format!("base/{oid}"))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files
}

#[test]
fn a_flipped_ciphertext_byte_is_an_integrity_error_never_wrong_bytes() {
    if crate::common::sqlite_only("flips a ciphertext byte in the SQLite file") {
        return;
    }
    let s = TestServer::start();
    s.add_secret("victim", b"the-real-value");
    s.add_secret("other", b"other-value");
    let web = s.add_client("web");
    s.grant("g", &["web"], &["victim", "other"]);
    let db = rusqlite::Connection::open(s.db()).unwrap();
    db.busy_timeout(std::time::Duration::from_secs(5)).unwrap();
    let ct: Vec<u8> = db
        .query_row(
            "SELECT v.ciphertext FROM secret_versions v JOIN secrets s ON s.id = v.secret_id WHERE s.name = 'victim'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let mut flipped = ct.clone();
    flipped[14] ^= 0x01;
    db.execute(
        "UPDATE secret_versions SET ciphertext = ?1 WHERE secret_id = (SELECT id FROM secrets WHERE name = 'victim')",
        [&flipped],
    )
    .unwrap();
    let r = s
        .cli_as(&web, &["read", "victim"], None)
        .fails(1, "integrity check");
    assert!(r.raw_stdout.is_empty(), "no bytes on an integrity failure");
    // Another row's intact ciphertext moved onto this secret fails too.
    let other: (Vec<u8>, Vec<u8>) = db
        .query_row(
            "SELECT v.wrapped_key, v.ciphertext FROM secret_versions v JOIN secrets s ON s.id = v.secret_id WHERE s.name = 'other'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    db.execute(
        "UPDATE secret_versions SET wrapped_key = ?1, ciphertext = ?2 WHERE secret_id = (SELECT id FROM secrets WHERE name = 'victim')",
        rusqlite::params![other.0, other.1],
    )
    .unwrap();
    s.cli_as(&web, &["read", "victim"], None)
        .fails(1, "integrity check");
    assert_eq!(
        s.cli_as(&web, &["read", "other"], None).ok().stdout,
        "other-value"
    );
    let audit = s.cli(&["audit", "--secret", "victim"]).ok().stdout;
    assert!(audit.contains("integrity check failed"), "{audit}");
}

#[test]
fn wrong_or_missing_master_key_stops_the_server_with_a_clear_message() {
    let mut s = TestServer::start();
    s.add_secret("a", b"x");
    assert_eq!(s.stop(), 0);
    let key_path = s.state.join("master.key");
    let original = std::fs::read(&key_path).unwrap();
    let run = |s: &TestServer| {
        let mut cmd = crate::common::secretfs();
        cmd.args(["server", "run", "--state-dir"])
            .arg(&s.state)
            .args(["--listen", "127.0.0.1:0"]);
        run_cmd(cmd, None)
    };
    std::fs::write(&key_path, "ab".repeat(32) + "\n").unwrap();
    run(&s).fails(1, "does not match this database");
    std::fs::remove_file(&key_path).unwrap();
    run(&s).fails(1, "cannot read the master key");
    std::fs::write(&key_path, &original).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    run(&s).fails(1, "chmod 600");
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    // With the right key back, everything is still there.
    s.restart_on("127.0.0.1:0");
    assert_eq!(
        s.cli(&["secret", "list", "-o", "json"]).ok().json()[0]["name"],
        "a"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let s = TestServer::start_with(&["--max-secret-size", "1000"]);
    s.add_secret("ok", b"1");
    let before = s
        .cli(&["audit", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .len();
    for bad in [
        "/a", "a/", "a//b", "..", "a/../b", ".hidden", "a/.x", "sp ace", "a\u{0}b",
    ] {
        if bad.contains('\0') {
            continue; // argv cannot carry NUL; the unit tests cover it
        }
        s.cli_in(&["secret", "add", bad], b"v")
            .fails(1, "invalid secret name");
    }
    let long = "a".repeat(256);
    s.cli_in(&["secret", "add", &long], b"v")
        .fails(1, "255 bytes a segment");
    s.cli_in(&["secret", "add", "big"], &vec![b'x'; 1001])
        .fails(1, "over the limit of 1000 bytes");
    s.cli_in(&["secret", "add", "huge"], &vec![b'x'; 5 << 20])
        .fails(1, "max-secret-size");
    s.cli_in(&["secret", "add", "ok"], b"2")
        .fails(1, "secretfs secret rotate");
    s.cli_in(&["secret", "add", "empty"], b"")
        .fails(2, "--allow-empty");
    s.cli_in(&["secret", "rotate", "missing"], b"v")
        .fails(1, "secret \"missing\" not found");
    s.cli(&["secret", "rollback", "ok", "--to", "9"])
        .fails(1, "has no version 9");
    s.cli(&["client", "describe", "ghost"])
        .fails(1, "client \"ghost\" not found");
    s.cli(&["group", "add-client", "nogroup", "admin"])
        .fails(1, "group \"nogroup\" not found");
    s.cli(&["group", "add", "g"]).ok();
    s.cli(&["group", "add-secret", "g", "nosecret"])
        .fails(1, "secret \"nosecret\" not found");
    s.cli(&["group", "add-client", "g", "noclient"])
        .fails(1, "client \"noclient\" not found");
    s.cli(&["secret", "add", "x", "--mode", "9999"])
        .fails(2, "octal");
    s.cli(&["nonsense"]).fails(2, "unrecognized subcommand");
    let after = s.cli(&["audit", "-o", "json"]).ok().json();
    // Only the group creation was a change; nothing else was written.
    let changes: Vec<_> = after.as_array().unwrap()[before..]
        .iter()
        .filter(|e| e["allowed"] == true && e["action"] != "secret.read")
        .map(|e| e["action"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(changes, ["group.create"]);
    assert_eq!(
        s.cli(&["secret", "list", "-o", "json"])
            .ok()
            .json()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Connection settings missing or wrong.
    let mut cmd = crate::common::secretfs();
    cmd.env_clear().args(["secret", "list"]);
    run_cmd(cmd, None).fails(2, "SECRETFS_SERVER");
    let mut cmd = s.cmd_as(&s.admin);
    cmd.env("SECRETFS_CA", s.tmp.path().join("nope.pem"))
        .args(["secret", "list"]);
    run_cmd(cmd, None).fails(1, "cannot read the CA certificate");
    let mut cmd = s.cmd_as(&s.admin);
    cmd.env("SECRETFS_SERVER", "https://127.0.0.1:1")
        .args(["secret", "list"]);
    run_cmd(cmd, None).fails(1, "Connection refused");
}

#[test]
fn certificates_from_another_ca_are_refused_both_ways() {
    let s = TestServer::start();
    let other = TestServer::start();
    // Our CA, their client certificate: the server refuses it.
    let mut cmd = s.cmd_as(&other.admin);
    cmd.args(["secret", "list"]);
    let r = run_cmd(cmd, None);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("certificate"), "{}", r.stderr);
    // Their CA for our server: the CLI refuses the server.
    let mut cmd = s.cmd_as(&s.admin);
    cmd.env("SECRETFS_CA", other.state.join("ca.pem"))
        .args(["secret", "list"]);
    run_cmd(cmd, None).fails(1, "not signed by the CA");
}

#[test]
fn init_refuses_an_existing_state_dir_and_prints_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("st");
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "init", "--state-dir"]).arg(&dir).args([
        "--san",
        "secrets.internal",
        "--san",
        "10.0.0.5",
    ]);
    let r = run_cmd(cmd, None).ok();
    for var in [
        "SECRETFS_SERVER=https://127.0.0.1:7443",
        "SECRETFS_CA=",
        "SECRETFS_CERT=",
        "SECRETFS_KEY=",
    ] {
        assert!(r.stdout.contains(&format!("export {var}")), "{}", r.stdout);
    }
    let key_before = std::fs::read(dir.join("master.key")).unwrap();
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "init", "--state-dir"]).arg(&dir);
    run_cmd(cmd, None).fails(1, "already exists");
    assert_eq!(std::fs::read(dir.join("master.key")).unwrap(), key_before);
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "init", "--state-dir"])
        .arg(tmp.path().join("x"))
        .args(["--san", "bad name!"]);
    run_cmd(cmd, None).fails(1, "neither an IP address nor a DNS name");
    assert!(
        !tmp.path().join("x").exists(),
        "a failed init leaves nothing"
    );
}

#[test]
fn sigterm_stops_the_server_gracefully() {
    let mut s = TestServer::start();
    s.add_secret("a", b"x");
    assert_eq!(s.stop(), 0);
    assert!(s.log().contains("server stopped"), "{}", s.log());
}

#[test]
fn an_unwritable_database_stops_the_server_with_a_clear_message() {
    if crate::common::sqlite_only("puts the SQLite file on a read-only filesystem") {
        return;
    }
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root to make a read-only mount"
    );
    let mut s = TestServer::start();
    s.add_secret("a", b"x");
    // Killed, so the WAL files stay: SQLite would then open read-only
    // without a word if the server did not check.
    s.kill9();
    // The state directory on a read-only filesystem.
    let ro = s.tmp.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    let sh = |script: &str| {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        run_cmd(cmd, None).ok();
    };
    sh(&format!(
        "mount -t tmpfs tmpfs {0} && cp -a {1} {0}/state && mount -o remount,ro {0}",
        ro.display(),
        s.state.display()
    ));
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "run", "--state-dir"])
        .arg(ro.join("state"))
        .args(["--listen", "127.0.0.1:0"]);
    let r = run_cmd(cmd, None);
    sh(&format!("umount {}", ro.display()));
    r.fails(1, "the database is not writable");
}
