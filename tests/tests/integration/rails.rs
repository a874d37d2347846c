//! Safety rails, as an operator hits them: a second server on one state
//! directory, confirmations before removals, the CLI's timeout against a
//! stopped server, each mistake in the client's own files named before
//! connecting, and private keys others can read.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use secretfs_proto::channel::ConnectFailure;
use secretfs_proto::v1;
use secretfs_proto::v1::secrets_client::SecretsClient;

use crate::common::*;

fn server_run(state: &Path) -> Command {
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "run", "--state-dir"])
        .arg(state)
        .args(["--listen", "127.0.0.1:0"]);
    cmd
}

#[test]
fn a_second_server_on_one_state_directory_is_refused() {
    let mut s = TestServer::start();
    let pid = s.pid();
    let r = run_cmd(server_run(&s.state), None).fails(1, "is in use by another secretfs server");
    assert!(r.stderr.contains(&format!("pid {pid}")), "{}", r.stderr);
    assert!(r.stderr.contains("Stop that server first"), "{}", r.stderr);
    // The same through the environment, as the systemd unit sets it.
    let mut cmd = crate::common::secretfs();
    cmd.args(["server", "run"])
        .env("SECRETFS_STATE_DIR", &s.state)
        .env("SECRETFS_LISTEN", "127.0.0.1:0");
    run_cmd(cmd, None).fails(1, &format!("pid {pid}"));
    // init never touches a directory a server is using.
    let mut init = crate::common::secretfs();
    init.args(["server", "init", "--state-dir"]).arg(&s.state);
    run_cmd(init, None).fails(1, "in use by another secretfs server");
    // The first server is unharmed, and once it stops the directory is free.
    s.cli(&["whoami"]).ok();
    assert_eq!(s.stop(), 0);
    s.restart_on("127.0.0.1:0");
    s.cli(&["whoami"]).ok();
    // A killed server leaves no stale lock behind.
    s.kill9();
    s.restart_on("127.0.0.1:0");
    s.cli(&["whoami"]).ok();
}

/// A pseudo-terminal: the CLI sees a terminal on stdin; the test types
/// into the other side.
struct Pty {
    master: std::fs::File,
    slave: PathBuf,
}

impl Pty {
    fn open() -> Pty {
        use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        Pty {
            master: std::fs::File::from(master),
            slave: PathBuf::from(name.to_str().expect("pty name").to_owned()),
        }
    }

    /// Runs `cmd` with the terminal as stdin, typing `answer` into it.
    fn run(&mut self, mut cmd: Command, answer: &str) -> Run {
        use std::io::Write;
        let stdin = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.slave)
            .expect("open the pty's terminal side");
        cmd.stdin(Stdio::from(stdin))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().expect("spawn secretfs");
        // The terminal keeps the line until the CLI reads it.
        self.master.write_all(answer.as_bytes()).unwrap();
        let out = wait_bounded(child, Duration::from_secs(60));
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            raw_stdout: out.stdout,
        }
    }
}

fn secret_names(s: &TestServer) -> Vec<String> {
    s.cli(&["secret", "list", "-o", "json"])
        .ok()
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn removals_ask_on_a_terminal_and_scripts_are_not_asked() {
    let s = TestServer::start();
    s.add_secret("db/password", b"v1");
    s.cli_in(&["secret", "rotate", "db/password"], b"v2").ok();
    s.add_secret("scripted", b"x");
    s.add_client("app");
    s.grant("web", &["app"], &["db/password"]);
    let mut pty = Pty::open();
    let admin = s.admin.clone();
    let cli = |args: &[&str]| {
        let mut cmd = s.cmd_as(&admin);
        cmd.args(args);
        cmd
    };

    // No terminal (a script, CI): no question, as before.
    let r = s.cli(&["secret", "delete", "scripted"]).ok();
    assert!(!r.stderr.contains("[y/N]"), "{}", r.stderr);
    assert_eq!(secret_names(&s), ["db/password"]);

    // On a terminal: the question says what goes; "n" (or just Enter) keeps it.
    let r = pty.run(cli(&["secret", "delete", "db/password"]), "n\n");
    assert!(
        r.stderr
            .contains("Delete secret db/password and its 2 versions? It leaves every mount and the groups that grant it (web)"),
        "{}",
        r.stderr
    );
    r.fails(1, "nothing was changed");
    pty.run(cli(&["secret", "delete", "db/password"]), "\n")
        .fails(1, "--yes");
    assert_eq!(secret_names(&s), ["db/password"]);

    let r = pty.run(cli(&["group", "remove", "web"]), "no\n");
    assert!(
        r.stderr.contains(
            "Remove group web? Its 1 client (app) lose the 1 secret (db/password) it grants"
        ),
        "{}",
        r.stderr
    );
    r.fails(1, "not confirmed");
    let r = pty.run(cli(&["client", "remove", "app"]), "n\n");
    assert!(
        r.stderr.contains(
            "Remove client app, in 1 group (web)? Its certificate stops working at once."
        ),
        "{}",
        r.stderr
    );
    r.fails(1, "not confirmed");
    s.cli(&["client", "describe", "app"]).ok();

    // "y" goes ahead; so does --yes, without asking.
    pty.run(cli(&["client", "remove", "app"]), "y\n").ok();
    s.cli(&["client", "describe", "app"]).fails(1, "not found");
    let r = pty.run(cli(&["group", "remove", "-y", "web"]), "");
    assert!(!r.stderr.contains("[y/N]"), "{}", r.stderr);
    r.ok();
    pty.run(cli(&["secret", "delete", "db/password"]), "yes\n")
        .ok();
    assert!(secret_names(&s).is_empty());
    // A name that does not exist is "not found", not a question.
    pty.run(cli(&["secret", "delete", "ghost"]), "y\n")
        .fails(1, "not found");
}

fn signal_pid(pid: u32, sig: Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
    rustix::process::kill_process(pid, sig).expect("signal the server");
}

/// SIGCONT when dropped, so a failed assertion never leaves a stopped
/// server behind.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        signal_pid(pid, Signal::STOP);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        signal_pid(self.0, Signal::CONT);
    }
}

#[test]
fn the_cli_gives_up_on_a_stopped_server_after_its_timeout() {
    let s = TestServer::start();
    s.add_secret("a", b"x");
    // A channel made before the server stops: each call is bounded too.
    let rt = rt();
    let channel = rt
        .block_on(secretfs_proto::connect_with_call_timeout(
            &s.connect_config(&s.admin),
            Duration::from_secs(2),
        ))
        .unwrap();
    {
        let _stopped = Stopped::new(s.pid());
        let r = s.cli(&["--timeout", "2s", "secret", "list"]);
        r.fails(1, "within 2s (--timeout/SECRETFS_TIMEOUT)")
            .fails(1, "allow longer with --timeout");
        let mut cmd = s.cmd_as(&s.admin);
        cmd.env("SECRETFS_TIMEOUT", "1s").args(["whoami"]);
        run_cmd(cmd, None).fails(1, "within 1s");

        let status = rt
            .block_on(SecretsClient::new(channel).who_am_i(v1::Empty {}))
            .expect_err("a stopped server cannot answer");
        assert_eq!(
            ConnectFailure::classify(&status),
            ConnectFailure::Timeout,
            "{status:?}"
        );
    }
    // Running again, the same command works.
    s.cli(&["--timeout", "2s", "secret", "list"]).ok();
    s.cli(&["--timeout", "0s", "secret", "list"])
        .fails(2, "would fail every call");
}

#[test]
fn mistakes_in_the_clients_own_files_are_named_before_connecting() {
    let s = TestServer::start();
    let app = s.add_client("app");
    let dir = s.tmp.path().join("files");
    std::fs::create_dir(&dir).unwrap();
    let with = |ca: &Path, cert: &Path, key: &Path| {
        let mut cmd = s.cmd_as(&s.admin);
        cmd.env("SECRETFS_CA", ca)
            .env("SECRETFS_CERT", cert)
            .env("SECRETFS_KEY", key)
            .args(["whoami"]);
        run_cmd(cmd, None)
    };
    let ca = s.state.join("ca.pem");
    let (cert, key) = (s.admin.cert.clone(), s.admin.key.clone());
    with(&ca, &cert, &key).ok();

    // Each mistake names the file and the fix.
    let r = with(&ca, &cert, &app.key).fails(1, "does not belong to the client certificate");
    assert!(r.stderr.contains(app.key.to_str().unwrap()), "{}", r.stderr);
    let old = s.cert_from_state_ca(
        "admin",
        &dir.join("old"),
        rcgen::date_time_ymd(2020, 1, 1),
        rcgen::date_time_ymd(2021, 1, 1),
    );
    with(&ca, &old.cert, &old.key)
        .fails(1, "expired at 2021-01-01T00:00:00Z")
        .fails(1, "have an admin issue a new certificate");
    with(
        &ca,
        &s.state.join("server.pem"),
        &s.state.join("server.key"),
    )
    .fails(1, "is not for client authentication")
    .fails(1, "not server.pem");
    with(&key, &cert, &key)
        .fails(
            1,
            "(given by --ca/SECRETFS_CA) holds a private key, not a certificate",
        )
        .fails(1, "keep keys out of --ca");
    with(&ca, &key, &cert).fails(1, "were --cert and --key swapped?");
    with(&cert, &cert, &key).fails(1, "holds no CA certificate: CN=admin is a client's");
    let csr = dir.join("app.csr");
    let csr_pem = rcgen::CertificateParams::new(vec!["app".to_owned()])
        .unwrap()
        .serialize_request(&rcgen::KeyPair::generate().unwrap())
        .unwrap()
        .pem()
        .unwrap();
    std::fs::write(&csr, csr_pem).unwrap();
    with(&ca, &csr, &key)
        .fails(1, "holds a certificate request (CSR), not a certificate")
        .fails(1, "client add NAME --csr FILE");
    let empty = dir.join("empty.key");
    std::fs::write(&empty, "").unwrap();
    with(&ca, &cert, &empty).fails(
        1,
        &format!(
            "the client key {} (given by --key/SECRETFS_KEY) is empty",
            empty.display()
        ),
    );

    // The mount checks the same files, before it mounts anything.
    let mountpoint = s.tmp.path().join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let mut cmd = s.cmd_as(&s.admin);
    cmd.env("SECRETFS_CA", &key).arg("mount").arg(&mountpoint);
    run_cmd(cmd, None).fails(1, "holds a private key, not a certificate");
    assert!(!is_mounted(&mountpoint));

    // Another CA's client certificate: a hint (it may be trusted through
    // --client-ca), then the server's refusal.
    let other = TestServer::start();
    with(&ca, &other.admin.cert, &other.admin.key)
        .fails(1, "was not issued by the CA in")
        .fails(1, "--client-ca");
}

#[test]
fn private_keys_others_can_read_are_warned_about() {
    let mut s = TestServer::start();
    let loose = s.tmp.path().join("loose.key");
    std::fs::copy(&s.admin.key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut cmd = s.cmd_as(&s.admin);
    cmd.env("SECRETFS_KEY", &loose).arg("whoami");
    let r = run_cmd(cmd, None).ok();
    assert!(
        r.stderr.contains(&format!(
            "the private key {} is readable by everyone (mode 0644); run `chmod 600 {}`",
            loose.display(),
            loose.display()
        )),
        "{}",
        r.stderr
    );
    // A key kept 0600 draws no warning.
    let r = s.cli(&["whoami"]).ok();
    assert!(!r.stderr.contains("chmod"), "{}", r.stderr);

    // The server's own keys, at start.
    assert_eq!(s.stop(), 0);
    let server_key = s.state.join("server.key");
    std::fs::set_permissions(&server_key, std::fs::Permissions::from_mode(0o640)).unwrap();
    s.restart_on("127.0.0.1:0");
    let log = s.log();
    assert!(
        log.contains(&format!("run `chmod 600 {}`", server_key.display())),
        "{log}"
    );
    assert!(!log.contains("ca.key is readable"), "{log}");
}

#[test]
fn zero_days_and_zero_limit_are_refused_with_the_range() {
    let s = TestServer::start();
    let out = s.tmp.path().join("x");
    s.cli(&[
        "client",
        "add",
        "x",
        "--days",
        "0",
        "--out",
        out.to_str().unwrap(),
    ])
    .fails(2, "1..=3650");
    assert!(!out.exists(), "nothing written");
    s.cli(&["audit", "--limit", "0"]).fails(2, "1..=100000");
    s.cli(&["client", "describe", "x"]).fails(1, "not found");
}

/// The server's flags as the systemd unit sets them: each `SECRETFS_*`
/// form that `server init --help` and `server run --help` show is
/// documented in the unit file.
#[test]
fn the_server_unit_documents_every_server_variable() {
    let unit = repo_file("deploy/systemd/secretfs-server.service");
    let mut seen = Vec::new();
    for sub in ["init", "run"] {
        let mut cmd = crate::common::secretfs();
        cmd.args(["server", sub, "--help"]);
        let help = run_cmd(cmd, None).ok().stdout;
        // Help wraps lines anywhere, "[env:" and its name included.
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        for part in help.split("[env: ").skip(1) {
            let var = part.split(['=', ']']).next().unwrap().to_owned();
            // The connection settings every command shares are the CLI's.
            let client_side = [
                "SECRETFS_SERVER",
                "SECRETFS_CA",
                "SECRETFS_CERT",
                "SECRETFS_KEY",
                "SECRETFS_TIMEOUT",
            ];
            if client_side.contains(&var.as_str()) {
                continue;
            }
            assert!(
                unit.contains(&format!("#   {var}=")),
                "the server unit does not document {var} (from `server {sub} --help`)"
            );
            seen.push(var);
        }
    }
    for var in [
        "SECRETFS_STATE_DIR",
        "SECRETFS_SAN",
        "SECRETFS_MAX_CONNECTIONS",
    ] {
        assert!(
            seen.iter().any(|v| v == var),
            "{var} not in the help: {seen:?}"
        );
    }
}

/// Killed when dropped, so a failed assertion leaves no server running.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `server init` and `server run` configured through the environment
/// alone, as the systemd unit does it.
#[test]
fn the_server_takes_every_setting_from_the_environment() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut init = crate::common::secretfs();
    init.args(["server", "init"])
        .env("SECRETFS_STATE_DIR", &state)
        .env("SECRETFS_TRUST_DOMAIN", "example.org")
        .env("SECRETFS_SAN", "secrets.internal,127.0.0.1")
        .env("SECRETFS_ADVERTISE", "secrets.internal:7443");
    let r = run_cmd(init, None).ok();
    assert!(
        r.stdout
            .contains("export SECRETFS_SERVER=https://secrets.internal:7443"),
        "{}",
        r.stdout
    );
    let pem = std::fs::read(state.join("server.pem")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let cert = pem.parse_x509().unwrap();
    let sans = format!(
        "{:?}",
        cert.subject_alternative_name().unwrap().unwrap().value
    );
    assert!(
        sans.contains("secrets.internal") && sans.contains("[127, 0, 0, 1]"),
        "{sans}"
    );

    let address_file = tmp.path().join("address.json");
    let server = crate::common::secretfs()
        .args(["server", "run"])
        .env("SECRETFS_STATE_DIR", &state)
        .env("SECRETFS_LISTEN", "127.0.0.1:0")
        .env("SECRETFS_ADDRESS_FILE", &address_file)
        .env("SECRETFS_MAX_SECRET_SIZE", "1000")
        .env("SECRETFS_MAX_CONNECTIONS", "50")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut server = Killed(server);
    assert!(
        eventually(Duration::from_secs(30), || {
            address_file.exists() || matches!(server.0.try_wait(), Ok(Some(_)))
        }),
        "the server neither started nor stopped"
    );
    let text = std::fs::read_to_string(&address_file).expect("the server started");
    let addr: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut add = crate::common::secretfs();
    add.env_clear()
        .env("SECRETFS_SERVER", addr["addr"].as_str().unwrap())
        .env("SECRETFS_CA", state.join("ca.pem"))
        .env("SECRETFS_CERT", state.join("admin.pem"))
        .env("SECRETFS_KEY", state.join("admin.key"))
        .args(["secret", "add", "big"]);
    run_cmd(add, Some(&[b'x'; 2000])).fails(1, "over the limit of 1000 bytes");
}
