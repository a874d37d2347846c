//! The audit sink after review (issue 12, item 2): a write that blocks
//! marks the sink stalled (requests refused) until it completes, a FIFO
//! sink works, and stdout resumes after the last entry it exported, so
//! what was committed but not exported (kill -9) or written while the
//! server ran without it reaches it. And a trigger put into the database
//! file (it would rewrite entries before they are chained) is refused.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::audit_chain::{health, NOT_SERVING, SERVING};
use crate::common::{eventually, run_cmd, signal, wait_bounded, Identity, Run, Signal};

/// A server run straight from the binary (`server run` with `extra`), its
/// stdout piped to the test.
struct Raw {
    child: Option<Child>,
    addr: String,
    health_addr: Option<String>,
    state: PathBuf,
    admin: Identity,
}

fn init(tmp: &Path) -> PathBuf {
    crate::common::init_state(tmp, &[]).0
}

impl Raw {
    fn start(state: &Path, extra: &[&str]) -> (Raw, ChildStdout) {
        let address = state.with_file_name(format!(
            "addr-{}.json",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut child = crate::common::secretfs()
            .args(["server", "run", "--state-dir"])
            .arg(state)
            .args(["--listen", "127.0.0.1:0", "--address-file"])
            .arg(&address)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        assert!(eventually(Duration::from_secs(30), || address.exists()));
        let addr: serde_json::Value = eventually_json(&address);
        (
            Raw {
                child: Some(child),
                addr: addr["addr"].as_str().unwrap().to_owned(),
                health_addr: addr["health_addr"].as_str().map(str::to_owned),
                state: state.to_owned(),
                admin: Identity::in_dir(state, "admin"),
            },
            stdout,
        )
    }

    fn cli(&self, args: &[&str], input: Option<&[u8]>) -> Run {
        let mut c = crate::common::secretfs();
        c.args(args)
            .arg("--server")
            .arg(format!("https://{}", self.addr))
            .arg("--ca")
            .arg(self.state.join("ca.pem"))
            .arg("--cert")
            .arg(&self.admin.cert)
            .arg("--key")
            .arg(&self.admin.key);
        run_cmd(c, input)
    }

    fn stop(&mut self, sig: Signal) {
        if let Some(child) = self.child.take() {
            signal(&child, sig);
            let _ = wait_bounded(child, Duration::from_secs(30));
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.stop(Signal::KILL);
    }
}

fn eventually_json(path: &Path) -> serde_json::Value {
    let mut v = serde_json::Value::Null;
    assert!(eventually(Duration::from_secs(10), || {
        match std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
        {
            Some(found) => {
                v = found;
                true
            }
            None => false,
        }
    }));
    v
}

/// Collects the lines of `from` (until its end) as JSON.
fn collect(from: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<serde_json::Value>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = seen.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(from).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                into.lock().unwrap().push(v);
            }
        }
    });
    seen
}

fn created(seen: &Mutex<Vec<serde_json::Value>>, name: &str) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|l| l["action"] == "secret.create" && l["secret"] == name)
        .count()
}

#[test]
fn a_sink_whose_write_blocks_is_marked_stalled_and_recovers_when_it_completes() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path());
    let (mut s, stdout) = Raw::start(
        &state,
        &[
            "--audit-log",
            "-",
            "--audit-log-stall-secs",
            "1",
            "--health-listen",
            "127.0.0.1:0",
        ],
    );
    let health_addr = s.health_addr.clone().unwrap();
    assert_eq!(health(&health_addr), SERVING);
    // Never read (a stalled log shipper) until the pipe is full and the
    // sink blocks: then requests are refused, naming the stall.
    let long = ["x".repeat(250), "y".repeat(250), "z".repeat(250)].join("/");
    let mut refused = None;
    for i in 0..400 {
        let run = s.cli(
            &["secret", "add", &format!("stall/{long}/{i:03}")],
            Some(b"v"),
        );
        if run.code != 0 {
            refused = Some(run);
            break;
        }
    }
    let refused = refused.expect("a sink that cannot write was never noticed");
    assert!(
        refused
            .stderr
            .contains("stalled: no write completed for 1 s")
            && refused.stderr.contains("the audit log on stdout"),
        "{}",
        refused.stderr
    );
    assert!(eventually(Duration::from_secs(10), || health(&health_addr)
        == NOT_SERVING));
    // The reader comes back: the write completes and requests are served.
    let seen = collect(stdout);
    assert!(eventually(Duration::from_secs(30), || s
        .cli(&["secret", "add", "stall/after"], Some(b"v"))
        .code
        == 0));
    assert!(eventually(Duration::from_secs(20), || created(
        &seen,
        "stall/after"
    ) == 1));
    assert!(eventually(Duration::from_secs(10), || health(&health_addr) == SERVING));
    s.stop(Signal::TERM);
}

#[test]
fn a_fifo_sink_needs_a_reader_at_start_and_then_delivers_every_line() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path());
    let fifo = tmp.path().join("audit.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    // No reader: refused at once with the fix, not blocked forever.
    let mut run = crate::common::secretfs();
    run.args(["server", "run", "--state-dir"])
        .arg(&state)
        .args(["--listen", "127.0.0.1:0", "--audit-log"])
        .arg(&fifo);
    run_cmd(run, None).fails(1, "is a FIFO with no reader");
    // A reader (opened read-write, so it is there before the server).
    let reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    let seen = collect(reader);
    let fifo_arg = fifo.to_str().unwrap().to_owned();
    let (mut s, _stdout) = Raw::start(&state, &["--audit-log", &fifo_arg]);
    for i in 0..3 {
        s.cli(&["secret", "add", &format!("fifo/s{i}")], Some(b"v"))
            .ok();
    }
    assert!(eventually(Duration::from_secs(20), || (0..3)
        .all(|i| created(&seen, &format!("fifo/s{i}")) == 1)));
    s.stop(Signal::TERM);
}

#[test]
fn the_stdout_sink_resumes_after_the_last_entry_it_exported() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path());
    let stdout_sink = ["--audit-log", "-"];
    // A first run exports its entries.
    let (mut s, out) = Raw::start(&state, &stdout_sink);
    let first = collect(out);
    s.cli(&["secret", "add", "resume/one"], Some(b"v")).ok();
    assert!(eventually(Duration::from_secs(20), || created(
        &first,
        "resume/one"
    ) == 1));
    s.stop(Signal::TERM);
    // A run without the sink: its entry is committed, never exported.
    let (mut s, _out) = Raw::start(&state, &[]);
    s.cli(&["secret", "add", "resume/offline"], Some(b"v")).ok();
    s.stop(Signal::TERM);
    // The next run with the sink sends it, and nothing twice.
    let (mut s, out) = Raw::start(&state, &stdout_sink);
    let second = collect(out);
    assert!(
        eventually(Duration::from_secs(20), || created(
            &second,
            "resume/offline"
        ) == 1),
        "{:?}",
        second.lock().unwrap()
    );
    assert_eq!(created(&second, "resume/one"), 0);
    // kill -9 right after a change: the restart sends it if it was not.
    s.cli(&["secret", "add", "resume/killed"], Some(b"v")).ok();
    s.stop(Signal::KILL);
    let (mut s, out) = Raw::start(&state, &stdout_sink);
    let third = collect(out);
    assert!(eventually(Duration::from_secs(20), || {
        created(&second, "resume/killed") + created(&third, "resume/killed") >= 1
    }));
    s.stop(Signal::TERM);
}

#[test]
fn keeping_no_rotated_audit_file_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path());
    let mut run = crate::common::secretfs();
    run.args(["server", "run", "--state-dir"])
        .arg(&state)
        .args(["--listen", "127.0.0.1:0", "--audit-log"])
        .arg(tmp.path().join("audit.jsonl"))
        .args(["--audit-log-keep", "0"]);
    let out = run_cmd(run, None).fails(2, "--audit-log-keep");
    assert!(out.stderr.contains("0 is not in 1.."), "{}", out.stderr);
}

#[test]
fn a_trigger_in_the_database_file_is_refused_by_run_and_named_by_verify() {
    if crate::common::sqlite_only("plants a trigger in the SQLite file") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = init(tmp.path());
    let conn = rusqlite::Connection::open(state.join("secretfs.db")).unwrap();
    conn.execute_batch(
        "CREATE TRIGGER hide AFTER INSERT ON audit WHEN NEW.actor = 'evil'
         BEGIN UPDATE audit SET actor = 'alice' WHERE id = NEW.id; END;",
    )
    .unwrap();
    drop(conn);
    let mut run = crate::common::secretfs();
    run.args(["server", "run", "--state-dir"])
        .arg(&state)
        .args(["--listen", "127.0.0.1:0"]);
    let out = run_cmd(run, None).fails(1, "trigger \"hide\"");
    assert!(
        out.stderr.contains("Restore it from a backup"),
        "{}",
        out.stderr
    );
    let mut verify = crate::common::secretfs();
    verify.args(["server", "verify", "--state-dir"]).arg(&state);
    run_cmd(verify, None).fails(1, "trigger \"hide\"");
}
