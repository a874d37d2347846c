//! The tamper-evident audit (issue 12, item 2): the hash chain and its
//! head, `audit verify` on every kind of break made by editing the SQLite
//! file directly, and the JSON-lines sink (rotation, stdout, a sink that
//! cannot write refuses requests and then catches up).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::{eventually, rt, run_cmd, wait_bounded, TestServer};

/// A handful of audited changes.
fn some_changes(s: &TestServer, n: usize) {
    for i in 0..n {
        s.add_secret(&format!("chain/s{i}"), b"v");
    }
}

fn sql(db: &Path, sql: &str) {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.execute_batch(sql)
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

fn last_id(db: &Path) -> u64 {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row("SELECT MAX(id) FROM audit", [], |r| r.get::<_, i64>(0))
        .unwrap() as u64
}

/// `audit verify -o json`: its JSON and whether it exited 0.
fn verify(s: &TestServer) -> (serde_json::Value, bool) {
    let run = s.cli(&["audit", "verify", "-o", "json"]);
    let ok = run.code == 0;
    if !ok {
        assert_eq!(run.code, 1, "stderr: {}", run.stderr);
        assert!(
            run.stderr.contains("the audit chain is broken at entry"),
            "{}",
            run.stderr
        );
    }
    (run.json(), ok)
}

/// The database as it is now, checkpointed into one file.
fn snapshot(db: &Path, to: &Path) {
    sql(db, "PRAGMA wal_checkpoint(TRUNCATE);");
    std::fs::copy(db, to).unwrap();
}

fn restore(from: &Path, db: &Path) {
    for suffix in ["-wal", "-shm"] {
        let mut p = db.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    std::fs::copy(from, db).unwrap();
}

#[test]
fn every_kind_of_break_is_reported_at_its_entry() {
    if crate::common::sqlite_only(
        "breaks the audit chain by editing the SQLite file behind the server's back",
    ) {
        return;
    }
    let mut s = TestServer::start();
    some_changes(&s, 8);
    let (v, ok) = verify(&s);
    assert!(ok && v["whole"] == true, "{v}");
    let n = v["checked"].as_u64().unwrap();
    assert!(n >= 8, "{v}");
    assert_eq!(v["last_id"], n);
    assert_eq!(v["head"]["id"], n);
    s.stop();
    let db = s.db();
    let pristine = s.tmp.path().join("pristine.db");
    snapshot(&db, &pristine);
    let last = last_id(&db);
    assert_eq!(last, n);

    let cases: Vec<(&str, String, &str, u64)> = vec![
        (
            "a field edited",
            "UPDATE audit SET actor = 'someone-else' WHERE id = 4".into(),
            "edited",
            4,
        ),
        (
            "a middle entry deleted",
            "DELETE FROM audit WHERE id = 5".into(),
            "deleted",
            5,
        ),
        (
            "a forged entry inserted (later ids shifted up)",
            "UPDATE audit SET id = id + 1000000 WHERE id >= 3;
             UPDATE audit SET id = id - 1000000 + 1 WHERE id >= 1000000;
             INSERT INTO audit (id, at_ms, actor, action, allowed, detail, epoch, chain)
               SELECT 3, at_ms, 'mallory', action, 1, '', epoch, chain FROM audit WHERE id = 4;"
                .into(),
            "inserted",
            3,
        ),
        (
            "two entries swapped (reordered)",
            "UPDATE audit SET id = -1 WHERE id = 3;
             UPDATE audit SET id = 3 WHERE id = 6;
             UPDATE audit SET id = 6 WHERE id = -1;"
                .into(),
            "reordered",
            3,
        ),
        (
            "the last two deleted (truncated tail)",
            format!("DELETE FROM audit WHERE id > {}", last - 2),
            "truncated-tail",
            last - 1,
        ),
        (
            "the head row edited",
            format!(
                "DELETE FROM audit WHERE id = {last};
                 UPDATE audit_head SET last_id = {}, chain = (SELECT chain FROM audit WHERE id = {});",
                last - 1,
                last - 1
            ),
            "head-edited",
            last - 1,
        ),
        (
            "a chain value removed",
            "UPDATE audit SET chain = NULL WHERE id = 2".into(),
            "edited",
            2,
        ),
    ];
    for (what, edit, kind, id) in cases {
        restore(&pristine, &db);
        sql(&db, &edit);
        s.restart_on("127.0.0.1:0");
        let (v, ok) = verify(&s);
        assert!(!ok, "{what}: not found: {v}");
        assert_eq!(v["break"]["kind"], kind, "{what}: {v}");
        assert_eq!(v["break"]["id"], id, "{what}: {v}");
        // Text output says it in a sentence too.
        let text = s.cli(&["audit", "verify"]);
        assert!(
            text.stdout
                .contains(&format!("BROKEN at entry {id} ({kind})")),
            "{what}: {}",
            text.stdout
        );
        s.stop();
    }
    // And the untouched log is whole again.
    restore(&pristine, &db);
    s.restart_on("127.0.0.1:0");
    assert!(verify(&s).1);
    // An audited write after an edit of the head is refused, not chained
    // onto it.
    s.stop();
    sql(&db, "UPDATE audit_head SET last_id = last_id - 1");
    s.restart_on("127.0.0.1:0");
    assert!(
        eventually(Duration::from_secs(10), || s
            .log()
            .contains("the audit head row's MAC does not match")),
        "said at start: {}",
        s.log()
    );
    s.cli_in(&["secret", "add", "chain/after"], b"x")
        .fails(1, "audit head row");
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// (id, chain hex) of every entry in the database.
fn db_chain(db: &Path) -> Vec<(u64, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT id, lower(hex(chain)) FROM audit ORDER BY id")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

#[test]
fn the_sink_carries_the_chain_rotates_and_catches_a_rolled_back_database() {
    if crate::common::sqlite_only("rolls the SQLite file back behind the server's back") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("audit.jsonl");
    let log_arg = log.to_str().unwrap();
    let mut s = TestServer::start_with(&[
        "--audit-log",
        log_arg,
        "--audit-log-max-size",
        "4096",
        "--audit-log-keep",
        "2",
    ]);
    some_changes(&s, 40);
    let db = s.db();
    let last = last_id(&db);
    assert!(eventually(Duration::from_secs(20), || {
        lines(&log).last().is_some_and(|l| l["id"] == last)
    }));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&log).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let rotated = |n: u32| PathBuf::from(format!("{log_arg}.{n}"));
    assert!(rotated(1).exists() && rotated(2).exists() && !rotated(3).exists());
    // The files hold consecutive entries, each line carrying the chain
    // the database holds, and the previous one's.
    let mut all = Vec::new();
    for p in [rotated(2), rotated(1), log.clone()] {
        assert!(std::fs::metadata(&p).unwrap().len() <= 4096);
        all.extend(lines(&p));
    }
    let chains = db_chain(&db);
    for w in all.windows(2) {
        assert_eq!(
            w[1]["id"].as_u64().unwrap(),
            w[0]["id"].as_u64().unwrap() + 1
        );
        assert_eq!(w[1]["prev"], w[0]["chain"]);
    }
    for l in &all {
        let id = l["id"].as_u64().unwrap();
        let (_, chain) = chains.iter().find(|(i, _)| *i == id).unwrap();
        assert_eq!(l["chain"].as_str().unwrap(), chain);
        assert_eq!(l["epoch"], 1);
    }
    let (v, ok) = verify(&s);
    assert!(ok, "{v}");
    assert_eq!(v["sink"]["last_id"], last, "{v}");

    // Roll the database back: delete the tail and put back the head row
    // as it was (a restored backup of that row). The database alone looks
    // whole; the sink does not agree, and the server refuses to start.
    s.stop();
    let conn = rusqlite::Connection::open(&db).unwrap();
    let (head_id, head_chain, head_epoch, head_mac): (i64, Vec<u8>, i64, Vec<u8>) = conn
        .query_row(
            "SELECT last_id, chain, epoch, mac FROM audit_head",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .unwrap();
    drop(conn);
    s.restart_on("127.0.0.1:0");
    some_changes_named(&s, "late", 2);
    let newest = last_id(&db);
    assert!(eventually(Duration::from_secs(20), || {
        lines(&log).last().is_some_and(|l| l["id"] == newest)
    }));
    s.stop();
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute("DELETE FROM audit WHERE id > ?1", [head_id])
        .unwrap();
    conn.execute(
        "UPDATE audit_head SET last_id = ?1, chain = ?2, epoch = ?3, mac = ?4",
        rusqlite::params![head_id, head_chain, head_epoch, head_mac],
    )
    .unwrap();
    drop(conn);
    let mut run = crate::common::secretfs();
    run.args(["server", "run", "--state-dir"])
        .arg(&s.state)
        .args(["--listen", "127.0.0.1:0", "--audit-log", log_arg]);
    let out = run_cmd(run, None);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains(&format!("holds entry {newest}"))
            && out.stderr.contains("tail was deleted"),
        "{}",
        out.stderr
    );
    // A path that cannot be opened stops the start with the fix.
    let mut run = crate::common::secretfs();
    run.args(["server", "run", "--state-dir"])
        .arg(&s.state)
        .args(["--listen", "127.0.0.1:0", "--audit-log"])
        .arg(tmp.path().join("missing-dir/audit.jsonl"));
    let out = run_cmd(run, None);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr.contains("cannot open the audit log") && out.stderr.contains("--audit-log"),
        "{}",
        out.stderr
    );
    // The rolled-back database alone verifies whole (that is what the sink
    // is for): with the old sink files moved aside, as the error says, the
    // server starts and a new file gets the whole log.
    for p in [log.clone(), rotated(1), rotated(2)] {
        let aside = format!("{}.old", p.file_name().unwrap().to_str().unwrap());
        std::fs::rename(&p, tmp.path().join(aside)).unwrap();
    }
    s.restart_on("127.0.0.1:0");
    assert!(verify(&s).1);
    assert!(eventually(Duration::from_secs(20), || {
        lines(&log).last().is_some_and(|l| l["id"] == head_id)
    }));
}

fn some_changes_named(s: &TestServer, prefix: &str, n: usize) {
    for i in 0..n {
        s.add_secret(&format!("{prefix}/s{i}"), b"v");
    }
}

#[test]
fn the_stdout_sink_writes_one_json_line_per_entry() {
    if crate::common::sqlite_only("reads the last audit id from the SQLite file") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (state, _) = crate::common::init_state(tmp.path(), &[]);
    let address = tmp.path().join("addr.json");
    let mut child = crate::common::secretfs()
        .args(["server", "run", "--state-dir"])
        .arg(&state)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--audit-log",
            "-",
            "--address-file",
        ])
        .arg(&address)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let reader = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for l in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                seen.lock().unwrap().push(l);
            }
        })
    };
    assert!(eventually(Duration::from_secs(30), || address.exists()));
    let addr: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&address).unwrap()).unwrap();
    let admin = crate::common::Identity::in_dir(&state, "admin");
    let mut add = crate::common::secretfs();
    add.args(["secret", "add", "out/one", "--server"])
        .arg(format!("https://{}", addr["addr"].as_str().unwrap()))
        .arg("--ca")
        .arg(state.join("ca.pem"))
        .arg("--cert")
        .arg(&admin.cert)
        .arg("--key")
        .arg(&admin.key);
    run_cmd(add, Some(b"x")).ok();
    let is_ours =
        |l: &serde_json::Value| l["action"] == "secret.create" && l["secret"] == "out/one";
    let found = eventually(Duration::from_secs(20), || {
        seen.lock()
            .unwrap()
            .iter()
            .any(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| is_ours(&v)))
    });
    crate::common::signal(&child, crate::common::Signal::TERM);
    let _ = wait_bounded(child, Duration::from_secs(20));
    let _ = reader.join();
    let seen = seen.lock().unwrap();
    assert!(found, "no secret.create line on stdout: {seen:?}");
    let lines: Vec<serde_json::Value> = seen
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let line = lines.iter().find(|l| is_ours(l)).unwrap();
    let last = last_id(&state.join("secretfs.db"));
    assert_eq!(line["id"], last);
    assert_eq!(line["chain"].as_str().unwrap().len(), 64);
    assert_eq!(line["prev"].as_str().unwrap().len(), 64);
}

/// The gRPC health status (overall) on the plain-text health listener.
pub(crate) fn health(addr: &str) -> i32 {
    rt().block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = tonic_health::pb::health_client::HealthClient::new(channel);
        c.check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
    })
}

pub(crate) const SERVING: i32 = 1;
pub(crate) const NOT_SERVING: i32 = 2;

#[test]
fn a_sink_that_cannot_write_refuses_requests_and_catches_up_once_it_can() {
    if crate::common::sqlite_only(
        "reads the audit rows from the SQLite file to compare the sink with",
    ) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let small = tmp.path().join("small");
    std::fs::create_dir(&small).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"])
        .arg(&small)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a small tmpfs (tests run as root)");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = crate::common::detach(&self.0);
        }
    }
    let _unmount = Unmount(small.clone());
    let log = small.join("audit.jsonl");
    let s = TestServer::start_with(&[
        "--audit-log",
        log.to_str().unwrap(),
        "--health-listen",
        "127.0.0.1:0",
    ]);
    let health_addr = s.health_addr.clone().unwrap();
    s.add_secret("full/before", b"x");
    assert_eq!(health(&health_addr), SERVING);
    // Fill the filesystem.
    let filler = small.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 4096];
        while f.write_all(&block).and_then(|()| f.sync_all()).is_ok() {}
    }
    // Changes commit (the database is written first); once an export
    // fails (the file's last page is full too), every request is refused.
    let mut refused = String::new();
    let mut n = 0;
    assert!(
        eventually(Duration::from_secs(60), || {
            n += 1;
            let _ = s.cli_in(&["secret", "add", &format!("full/during{n}")], b"x");
            let run = s.cli(&["secret", "list"]);
            refused = run.stderr;
            run.code != 0
        }),
        "never refused"
    );
    let db = s.db();
    let pending = last_id(&db);
    assert!(
        refused.contains(&log.display().to_string())
            && refused.contains("cannot be written")
            && refused.contains("Free space"),
        "{refused}"
    );
    assert_eq!(health(&health_addr), NOT_SERVING);
    assert!(
        s.log().contains("the audit sink cannot be written"),
        "{}",
        s.log()
    );
    assert!(!lines(&log).iter().any(|l| l["id"] == pending));
    // Space again: it catches up (nothing lost) and requests succeed.
    std::fs::remove_file(&filler).unwrap();
    assert!(
        eventually(Duration::from_secs(30), || s.cli(&["secret", "list"]).code
            == 0),
        "never recovered: {}",
        s.log()
    );
    assert_eq!(health(&health_addr), SERVING);
    let ids: Vec<u64> = lines(&log)
        .iter()
        .map(|l| l["id"].as_u64().unwrap())
        .collect();
    assert!(ids.contains(&pending), "{ids:?}");
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    assert_eq!(ids[0], 1, "a new sink file starts with the whole log");
}

/// The log stays whole across completed rekeys (entries chained under
/// three key epochs, old audit keys kept sealed) and a kill -9 in the
/// middle of a third rekey followed by a restart.
#[test]
fn verify_is_whole_across_two_rekeys_and_a_restart() {
    let mut s = TestServer::start_with(&["--rekey-batch", "2", "--rekey-pause", "5ms"]);
    some_changes(&s, 5);
    s.cli(&["server", "rekey"]).ok();
    some_changes_named(&s, "mid", 3);
    let (v, ok) = verify(&s);
    assert!(ok, "after one rekey: {v}");
    s.cli(&["server", "rekey"]).ok();
    // kill -9 in the middle of a third rekey, then restart.
    let mut rekey = s.cmd_as(&s.admin.clone());
    rekey
        .args(["server", "rekey", "--no-wait"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = rekey.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    s.kill9();
    let _ = child.kill();
    let _ = child.wait();
    s.restart_on("127.0.0.1:0");
    some_changes_named(&s, "late", 3);
    let (v, ok) = verify(&s);
    assert!(ok, "after two rekeys and a restart: {v}\n{}", s.log());
    const EPOCHS: &str = "SELECT DISTINCT epoch FROM audit WHERE epoch IS NOT NULL ORDER BY epoch";
    let epochs: Vec<i64> = match &s.database {
        // Read behind the server as the superuser of the tests' cluster.
        Some(url) => secretfs_pgtest::PgCluster::shared()
            .superuser_on(url.rsplit('/').next().unwrap())
            .query(EPOCHS, &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect(),
        None => rusqlite::Connection::open(s.db())
            .unwrap()
            .prepare(EPOCHS)
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(Result::unwrap)
            .collect(),
    };
    assert!(epochs.len() >= 3, "{epochs:?}");
}
