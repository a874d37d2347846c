//! Several servers: `--server A,B` (and repeated flags) on the CLI and the
//! mount. The CLI connects to the first that answers and names every one
//! when none does; a mount whose server dies moves to the next, keeps its
//! files readable throughout, and follows changes made there.
//!
//! With the SQLite store two live "replicas" are two copies of one state
//! directory (same CA, master key and secrets), taken while the server is
//! stopped; the PostgreSQL replica tests are elsewhere.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

/// A loopback port nobody listens on (bound, then closed).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn the_cli_uses_the_next_server_when_the_first_is_dead() {
    let s = TestServer::start();
    let dead = format!("https://127.0.0.1:{}", free_port());
    let live = s.url();

    let list = format!("{dead},{live}");
    let out = s.cli(&["--server", &list, "whoami"]).ok();
    assert!(out.stdout.contains("admin"), "{}", out.stdout);
    // Two flags, the dead one first; and a list in SECRETFS_SERVER.
    s.cli(&["--server", &dead, "--server", &live, "secret", "list"])
        .ok();
    let mut cmd = s.cmd_as(&s.admin);
    cmd.env("SECRETFS_SERVER", &list).arg("whoami");
    run_cmd(cmd, None).ok();
    // A name: dialled by its address, the certificate checked by the name.
    let named = format!("{dead},localhost:{}", port_of(&s.addr));
    s.cli(&["--server", &named, "whoami"]).ok();
}

#[test]
fn when_every_server_is_dead_the_error_names_each_one_and_why() {
    let s = TestServer::start();
    let (a, b) = (
        format!("https://127.0.0.1:{}", free_port()),
        format!("https://127.0.0.1:{}", free_port()),
    );
    let out = s.cli(&["--server", &format!("{a},{b}"), "whoami"]);
    assert_ne!(out.code, 0, "{}", out.stderr);
    for server in [&a, &b] {
        assert!(out.stderr.contains(server.as_str()), "{}", out.stderr);
    }
    assert!(
        out.stderr.contains("server run"),
        "says why: {}",
        out.stderr
    );
    // Bad lists are usage errors naming the item.
    let live = s.url();
    s.cli(&["--server", &format!("{live},,{a}"), "whoami"])
        .fails(2, "empty item");
    s.cli(&["--server", &format!("{live},http://x:1"), "whoami"])
        .fails(2, "http://x:1");
}

fn moves(m: &Mount) -> usize {
    m.log().matches("moved to another server").count()
}

/// A second `server run` on a copy of a state directory: another replica
/// as far as a client can tell (same CA, same secrets).
struct Copy {
    child: Child,
    addr: String,
    _log: Arc<Mutex<String>>,
}

impl Copy {
    fn start(state: &Path, dir: &Path) -> Copy {
        let copy = dir.join("state-copy");
        let status = Command::new("cp")
            .arg("-a")
            .arg(state)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(status.success(), "cp -a {}", state.display());
        let address_file = dir.join("copy-address.json");
        let mut child = crate::common::secretfs()
            .args(["server", "run", "--state-dir"])
            .arg(&copy)
            .args(["--listen", "127.0.0.1:0", "--address-file"])
            .arg(&address_file)
            .env("SECRETFS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let start = Instant::now();
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&address_file) {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap();
                break v["addr"].as_str().unwrap().to_owned();
            }
            assert!(
                child.try_wait().unwrap().is_none() && start.elapsed() < LONG,
                "the copy did not start: {}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        Copy {
            child,
            addr,
            _log: log,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for Copy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Both replicas up: the one in use is killed; the mount moves to the other
/// at once, its files never go missing or empty and its status never says
/// disconnected; a rotation made there reaches it; the move is logged once.
#[test]
fn a_mount_moves_to_a_live_replica_without_a_gap() {
    let (mut s, app) = TestServer::start_for_app(&[("db/password", "pw-1")]);
    // The copy is taken while the server is stopped (SQLite's files whole).
    let port = port_of(&s.addr);
    assert_eq!(s.stop(), 0);
    let other = Copy::start(&s.state, s.tmp.path());
    s.restart_on(&format!("127.0.0.1:{port}"));

    let list = format!("{},{}", s.url(), other.url());
    let m = s.mount_as(&app, &["--server", &list, "--refresh", "1h"]);
    wait_for(&m, "db/password", b"pw-1");
    assert_eq!(moves(&m), 0, "{}", m.log());

    let reader = Reader::start(m.file("db/password"), Some(m.path.join(".secretfs/status")));
    s.kill9();
    // At once: not after a backoff or a keep-alive (20-30 s). A bound, not
    // a timing measurement: the point is the order of magnitude.
    assert!(
        eventually(Duration::from_secs(5), || moves(&m) == 1),
        "the move is logged within seconds of the kill:\n{}",
        m.log()
    );
    // The rotation is made on the replica the mount must have moved to.
    let mut cmd = s.cmd_as(&s.admin);
    cmd.env("SECRETFS_SERVER", other.url())
        .args(["secret", "rotate", "db/password"]);
    run_cmd(cmd, Some(b"pw-2")).ok();
    wait_for(&m, "db/password", b"pw-2");
    reader.finish(&m);
    let log = m.log();
    assert_eq!(moves(&m), 1, "{log}");
    let line = log
        .lines()
        .find(|l| l.contains("moved to another server"))
        .unwrap();
    assert!(line.contains(&other.addr), "names where it went: {line}");
    let status = m.status();
    assert_eq!(status["server"], list.as_str(), "{status}");
    assert_eq!(status["server_in_use"], other.url().as_str(), "{status}");
}

/// The server dies and comes back at the mount's second address: the files
/// stay readable while nothing answers (the mount serves what it holds),
/// and it follows the server to its new address.
#[test]
fn a_mount_follows_its_server_to_the_second_address() {
    let (mut s, app) = TestServer::start_for_app(&[("db/password", "pw-1")]);
    let second = format!("127.0.0.1:{}", free_port());
    let list = format!("{},https://{second}", s.url());
    let m = s.mount_as(&app, &["--server", &list, "--refresh", "1h"]);
    wait_for(&m, "db/password", b"pw-1");

    let reader = Reader::start(m.file("db/password"), None);
    s.kill9();
    s.restart_on(&second);
    s.cli_in(&["secret", "rotate", "db/password"], b"pw-2").ok();
    wait_for(&m, "db/password", b"pw-2");
    reader.finish(&m);
    assert!(
        eventually(LONG, || moves(&m) == 1),
        "the move is logged once:\n{}",
        m.log()
    );
    assert!(m.log().contains(&second), "{}", m.log());
}

/// The first server of the list is down when the mount starts: it syncs
/// from the second; the status shows the list it was given and the address
/// in use; the log names the address passed over.
#[test]
fn a_mount_starts_on_the_second_server_when_the_first_is_dead() {
    let (s, app) = TestServer::start_for_app(&[("db/password", "pw-1")]);
    let dead = format!("https://127.0.0.1:{}", free_port());
    let list = format!("{dead},{}", s.url());
    let m = s.mount_as(&app, &["--server", &list, "--refresh", "1h"]);
    wait_for(&m, "db/password", b"pw-1");
    let status = m.status();
    assert_eq!(status["connected"], true, "{status}");
    assert_eq!(status["server"], list.as_str(), "{status}");
    assert_eq!(status["server_in_use"], s.url().as_str(), "{status}");
    let log = m.log();
    let line = log
        .lines()
        .find(|l| l.contains("after passing over others that failed"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.contains(&dead),
        "names the address passed over: {line}"
    );
}

/// A replica that stops answering without closing anything (SIGSTOP: the
/// kernel keeps its connections open) is noticed by the keep-alive within
/// seconds, and the mount moves to the other.
#[test]
fn a_mount_leaves_a_replica_that_went_silent() {
    let (mut s, app) = TestServer::start_for_app(&[("db/password", "pw-1")]);
    let port = port_of(&s.addr);
    assert_eq!(s.stop(), 0);
    let silent = Copy::start(&s.state, s.tmp.path());
    s.restart_on(&format!("127.0.0.1:{port}"));

    let list = format!("{},{}", silent.url(), s.url());
    let m = s.mount_as(&app, &["--server", &list, "--refresh", "1h"]);
    wait_for(&m, "db/password", b"pw-1");
    assert_eq!(moves(&m), 0, "{}", m.log());
    let stopped = Command::new("kill")
        .args(["-STOP", &silent.child.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    // Keep-alive 1 s + 2 s, then the move; a bound well under the 30 s of
    // the default keep-alive.
    let moved = eventually(Duration::from_secs(15), || moves(&m) == 1);
    let _ = Command::new("kill")
        .args(["-CONT", &silent.child.id().to_string()])
        .status();
    assert!(moved, "no move away from a silent replica:\n{}", m.log());
    s.cli_in(&["secret", "rotate", "db/password"], b"pw-2").ok();
    wait_for(&m, "db/password", b"pw-2");
}

/// Counts TCP connections to a loopback listener that hangs up at once.
struct Counter {
    port: u16,
    count: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Counter {
    fn start() -> Counter {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, halt) = (count.clone(), stop.clone());
        std::thread::spawn(move || {
            while !halt.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        n.fetch_add(1, Ordering::Relaxed);
                        drop(conn);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Counter { port, count, stop }
    }

    fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every address down: after one round the status says disconnected (the
/// files stay: no --max-stale), and the mount backs off rather than
/// hammering them (connection attempts counted over a few seconds).
#[test]
fn with_every_address_down_the_mount_reports_it_and_backs_off() {
    let (mut s, app) = TestServer::start_for_app(&[("db/password", "pw-1")]);
    let counter = Counter::start();
    let list = format!("{},https://127.0.0.1:{}", s.url(), counter.port);
    let m = s.mount_as(&app, &["--server", &list, "--refresh", "1h"]);
    wait_for(&m, "db/password", b"pw-1");
    s.kill9();
    assert!(
        eventually(LONG, || m.status()["connected"] == false),
        "the outage is reported:\n{}",
        m.log()
    );
    assert!(counter.count() >= 1, "the second address was tried");
    let before = counter.count();
    std::thread::sleep(Duration::from_secs(5));
    let attempts = counter.count() - before;
    // Backoff from 100 ms doubling to 3 s: a handful of rounds in 5 s. A
    // loop without a pause would make thousands.
    assert!(
        attempts <= 30,
        "{attempts} connection attempts in 5 s:\n{}",
        m.log()
    );
    assert_eq!(std::fs::read(m.file("db/password")).unwrap(), b"pw-1");
    let status = m.status();
    assert!(status["last_error"].is_string(), "{status}");
}

/// The CLI as the admin in a mount namespace of its own where `localhost`
/// has two addresses, 127.0.0.1 and 127.0.0.2 (a private /etc/hosts bound
/// over the shared one, which is never touched).
fn cli_with_two_address_localhost(s: &TestServer, args: &[&str]) -> Run {
    let hosts = s.tmp.path().join("hosts");
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.2 localhost\n").unwrap();
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "sh",
        "-c",
        r#"mount --bind "$1" /etc/hosts || exit 97; shift; exec "$@""#,
        "sh",
    ])
    .arg(&hosts)
    .arg(bin())
    .args(args)
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
    .env("SECRETFS_CA", s.state.join("ca.pem"))
    .env("SECRETFS_CERT", &s.admin.cert)
    .env("SECRETFS_KEY", &s.admin.key);
    let run = run_cmd(cmd, None);
    assert_ne!(
        run.code, 97,
        "these tests need `unshare --mount` and bind mounts (root): {}",
        run.stderr
    );
    run
}

/// A name with two addresses is two endpoints: the server listens on the
/// second only (127.0.0.2, not in its certificate: TLS checks the name),
/// and the CLI gets through; with nothing listening, both are named.
#[test]
fn a_name_with_two_addresses_is_two_servers() {
    let mut s = TestServer::start();
    assert_eq!(s.stop(), 0);
    s.restart_on("127.0.0.2:0");
    let port = port_of(&s.addr);
    let out =
        cli_with_two_address_localhost(&s, &["--server", &format!("localhost:{port}"), "whoami"])
            .ok();
    assert!(out.stdout.contains("admin"), "{}", out.stdout);

    let dead = free_port();
    let out =
        cli_with_two_address_localhost(&s, &["--server", &format!("localhost:{dead}"), "whoami"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    for addr in ["127.0.0.1", "127.0.0.2"] {
        assert!(
            out.stderr.contains(&format!("{addr}:{dead}")),
            "names {addr}: {}",
            out.stderr
        );
    }
}

/// `--timeout` bounds each address, not each server: `localhost` has two
/// addresses, the first a listener that accepts TCP but never answers (a
/// stopped process), the second the live server. The first costs one
/// `--timeout` and is passed over; the command succeeds.
#[test]
fn an_address_that_never_answers_costs_one_timeout_and_is_passed_over() {
    let mut s = TestServer::start();
    assert_eq!(s.stop(), 0);
    s.restart_on("127.0.0.2:0");
    let port = port_of(&s.addr);
    // Accepts (the kernel completes the handshake) and never replies.
    let silent = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let out = cli_with_two_address_localhost(
        &s,
        &[
            "--timeout",
            "2s",
            "--server",
            &format!("localhost:{port}"),
            "whoami",
        ],
    )
    .ok();
    assert!(out.stdout.contains("admin"), "{}", out.stdout);
    drop(silent);
}
