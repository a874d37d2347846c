//! The mount's life as an operator or a supervisor sees it: `--background`
//! and sd_notify (a mount you can wait for), `--create-mountpoint`, the
//! `--refresh` lower bound, forced owner and mode, the status file's
//! certificate fields and time format, and the certificate renewing itself
//! without a remount. Needs root and /dev/fuse.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;

const LONG: Duration = Duration::from_secs(40);

fn setup() -> (TestServer, Identity) {
    TestServer::start_for_app(&[("db/password", "pw-1")])
}

fn is_rfc3339_utc(v: &serde_json::Value) -> bool {
    // 2026-11-29T15:53:10Z
    let s = v.as_str().unwrap_or("");
    s.len() == 20
        && s.ends_with('Z')
        && s.as_bytes()[10] == b'T'
        && s.chars().filter(|c| c.is_ascii_digit()).count() == 14
}

/// A mount started with `--background`: stopped (SIGTERM, then detached
/// if need be) on drop.
struct Background {
    pid: i32,
    path: PathBuf,
}

impl Background {
    fn alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
                .unwrap_or_default()
                .contains(") Z ")
    }

    fn status(&self) -> serde_json::Value {
        let text = std::fs::read_to_string(self.path.join(".secretfs/status")).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.pid) {
            let _ = rustix::process::kill_process(pid, Signal::TERM);
        }
        if !eventually(Duration::from_secs(20), || !is_mounted(&self.path)) {
            let _ = detach(&self.path);
        }
    }
}

/// `secretfs mount PATH ARGS --background` as `who`.
fn background(s: &TestServer, who: &Identity, path: &Path, args: &[&str]) -> Run {
    require_fuse();
    let mut cmd = s.cmd_as(who);
    cmd.arg("mount").arg(path).args(args).arg("--background");
    // Piped stdout and stderr, read to the end: this returns only once no
    // process holds them, as `$(secretfs mount --background ...)` would.
    run_cmd(cmd, None)
}

fn started(path: &Path, run: &Run) -> Background {
    // The pid alone on stdout (`pid=$(secretfs mount --background ...)`),
    // the sentence on stderr.
    let pid: i32 = run.stdout.trim().parse().expect("stdout is the pid alone");
    let expected = format!("mounted at {}, pid {pid}", path.display());
    assert!(run.stderr.contains(&expected), "stderr: {}", run.stderr);
    Background {
        pid,
        path: path.to_owned(),
    }
}

#[test]
fn background_returns_once_the_mount_is_ready() {
    let (s, app) = setup();
    let path = s.tmp.path().join("bg");
    std::fs::create_dir(&path).unwrap();
    let log = s.tmp.path().join("mount.log");
    let run = background(&s, &app, &path, &["--log-file", log.to_str().unwrap()]).ok();
    let m = started(&path, &run);
    // Ready means ready: no polling needed.
    assert!(is_mounted(&path));
    assert_eq!(std::fs::read(path.join("db/password")).unwrap(), b"pw-1");
    assert!(m.alive());
    assert_eq!(m.status()["connected"], true);
    // The child dropped its privileges as a foreground mount does, and left
    // the terminal's session.
    let status = std::fs::read_to_string(format!("/proc/{}/status", m.pid)).unwrap();
    assert_eq!(
        status_hex(&status, "CapEff"),
        (1u64 << 21) | (1u64 << 14),
        "{status}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", m.pid)).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        m.pid.to_string(),
        "session id is its own pid: {stat}"
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("mounted path="),
        "the child's log goes to --log-file"
    );
    assert_eq!(
        std::fs::metadata(&log).unwrap().mode() & 0o777,
        0o600,
        "the log file is private"
    );
    drop(m);
    assert!(!is_mounted(&path), "SIGTERM unmounts the background mount");
}

#[test]
fn background_fails_with_the_reason_and_leaves_nothing_mounted() {
    let (s, app) = setup();

    // No server there: the first sync gives up, and says so.
    let path = s.tmp.path().join("bg-no-server");
    std::fs::create_dir(&path).unwrap();
    let mut cmd = s.cmd_as(&app);
    cmd.env("SECRETFS_SERVER", "https://127.0.0.1:1")
        .arg("mount")
        .arg(&path)
        .args(["--start-timeout", "2s", "--background"]);
    let r = run_cmd(cmd, None).fails(1, "could not sync with the server at https://127.0.0.1:1");
    assert!(r.stdout.is_empty(), "{}", r.stdout);
    assert!(!is_mounted(&path));

    // A missing mountpoint: the child's own error, and the fix.
    let missing = s.tmp.path().join("no/such/dir");
    background(&s, &app, &missing, &[]).fails(1, "does not exist: create it");
    assert!(!missing.exists());

    // A usage mistake the child finds keeps its exit code.
    let path = s.tmp.path().join("bg-usage");
    std::fs::create_dir(&path).unwrap();
    background(&s, &app, &path, &["--public-status"]).fails(2, "--public-status goes with");
    assert!(!is_mounted(&path));
}

#[test]
fn notify_socket_gets_ready_after_the_first_sync_and_stopping_at_the_end() {
    let (s, app) = setup();
    let sock_path = s.tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(LONG)).unwrap();
    let path = s.tmp.path().join("notified");
    std::fs::create_dir(&path).unwrap();
    let mut m = s
        .mount_at_with(&app, &path, &[], |cmd| {
            cmd.env("NOTIFY_SOCKET", &sock_path);
        })
        .unwrap_or_else(|r| panic!("mount: {}", r.stderr));
    let mut buf = [0u8; 1024];
    let n = sock.recv(&mut buf).expect("a notification");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.contains("READY=1\n"), "{ready}");
    assert!(
        ready.contains(&format!(
            "STATUS=mounted at {} with 1 secrets",
            path.display()
        )),
        "{ready}"
    );
    assert!(ready.contains(&format!("MAINPID={}", m.pid())), "{ready}");
    // READY=1 came after the mount: the secret is there now.
    assert_eq!(std::fs::read(path.join("db/password")).unwrap(), b"pw-1");

    assert_eq!(m.stop(), 0);
    let n = sock.recv(&mut buf).expect("a notification at shutdown");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));

    // A failure is sent as the status, for `systemctl status`.
    let mut cmd = s.cmd_as(&app);
    cmd.env("NOTIFY_SOCKET", &sock_path)
        .arg("mount")
        .arg(s.tmp.path().join("missing"));
    run_cmd(cmd, None).fails(1, "does not exist");
    let n = sock.recv(&mut buf).expect("the failure");
    let failed = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(failed.starts_with("STATUS=failed: mountpoint "), "{failed}");
    assert!(!failed.contains("READY=1"));
}

#[test]
fn the_systemd_mount_unit_waits_for_ready() {
    let unit = repo_file("deploy/systemd/secretfs-mount@.service");
    assert!(unit.lines().any(|l| l == "Type=notify"), "{unit}");
    assert!(unit.lines().any(|l| l == "NotifyAccess=main"), "{unit}");
}

#[test]
fn create_mountpoint_makes_the_missing_directories() {
    let (s, app) = setup();
    // As in a container whose umask would make them private.
    let path = s.tmp.path().join("fresh/empty-dir/secrets");
    let m = s
        .mount_at(&app, &path, &["--create-mountpoint"])
        .unwrap_or_else(|r| panic!("mount: {}", r.stderr));
    assert_eq!(std::fs::read(m.file("db/password")).unwrap(), b"pw-1");
    for dir in ["fresh", "fresh/empty-dir"] {
        let mode = std::fs::metadata(s.tmp.path().join(dir)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o755, "{dir}");
    }
}

#[test]
fn refresh_below_one_second_is_refused() {
    let (s, app) = setup();
    let path = s.tmp.path().join("fast");
    std::fs::create_dir(&path).unwrap();
    let r = s.cli_as(
        &app,
        &["mount", path.to_str().unwrap(), "--refresh", "0s"],
        None,
    );
    r.fails(2, "0s is too short");
    let r = s.cli_as(
        &app,
        &["mount", path.to_str().unwrap(), "--refresh", "500ms"],
        None,
    );
    r.fails(2, "give 1s or more");
    assert!(!is_mounted(&path));
}

#[test]
fn forced_owner_and_mode_apply_to_every_file_and_show_in_the_status() {
    let s = TestServer::start();
    s.cli_in(
        &[
            "secret",
            "add",
            "tls/key.pem",
            "--mode",
            "0400",
            "--owner",
            "33",
        ],
        b"k",
    )
    .ok();
    s.add_secret("token", b"t");
    let app = s.add_client("app");
    s.grant("app", &["app"], &["tls/key.pem", "token"]);
    let m = s.mount_as(
        &app,
        &[
            "--force-uid",
            "1234",
            "--force-gid",
            "99",
            "--force-mode",
            "0440",
        ],
    );
    for name in ["tls/key.pem", "token"] {
        let md = std::fs::metadata(m.file(name)).unwrap();
        assert_eq!(
            (md.uid(), md.gid(), md.mode() & 0o7777),
            (1234, 99, 0o440),
            "{name}"
        );
    }
    let status = m.status();
    assert_eq!(status["force_uid"], 1234);
    assert_eq!(status["force_gid"], 99);
    assert_eq!(status["force_mode"], "0440");
}

#[test]
fn status_shows_the_certificate_and_one_time_format() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &[]);
    let status = m.status();
    assert_eq!(
        status["cert_serial"],
        cert_info(&app.cert).serial,
        "{status}"
    );
    assert!(is_rfc3339_utc(&status["cert_not_after"]), "{status}");
    assert!(is_rfc3339_utc(&status["last_sync"]), "{status}");
    // The certificate lasts 365 days: about a year from now.
    let year = status["cert_not_after"].as_str().unwrap()[..4]
        .parse::<u32>()
        .unwrap();
    let this_year = status["last_sync"].as_str().unwrap()[..4]
        .parse::<u32>()
        .unwrap();
    assert!(year == this_year + 1 || year == this_year, "{status}");
}

/// A client whose certificate lasts one day, in its own directory.
fn short_lived_client(s: &TestServer, name: &str) -> Identity {
    let out = s.tmp.path().join(format!("creds-{name}"));
    s.cli(&[
        "client",
        "add",
        name,
        "--days",
        "1",
        "--out",
        out.to_str().unwrap(),
    ])
    .ok();
    Identity::in_dir(&out, name)
}

#[test]
fn the_mount_renews_its_certificate_and_keeps_serving() {
    let s = TestServer::start();
    s.add_secret("db/password", b"pw-1");
    let app = short_lived_client(&s, "app");
    s.grant("app", &["app"], &["db/password"]);
    let old_serial = cert_info(&app.cert).serial;
    let old_key = std::fs::read(&app.key).unwrap();
    let m = s.mount_as(&app, &["--renew-after", "1s"]);
    let pid = m.pid();
    assert_eq!(m.status()["cert_serial"], old_serial);
    // A one-day certificate: the 30-day warning is in the log.
    assert!(
        eventually(LONG, || m.log().contains("expires within 30 days")),
        "{}",
        m.log()
    );

    let renewed = eventually(LONG, || {
        m.status()["cert_serial"].as_str() != Some(old_serial.as_str())
    });
    assert!(renewed, "no renewal: {}", m.log());
    let new_serial = m.status()["cert_serial"].as_str().unwrap().to_owned();

    // The files were replaced: a new key (0600) and its certificate.
    assert!(eventually(LONG, || cert_info(&app.cert).serial == new_serial));
    assert_ne!(std::fs::read(&app.key).unwrap(), old_key);
    assert_eq!(std::fs::metadata(&app.key).unwrap().mode() & 0o777, 0o600);
    assert!(
        m.log()
            .contains("renewed the client certificate and replaced its files"),
        "{}",
        m.log()
    );
    // The new pair works, and the server knows the new serial.
    let me = s.cli_as(&app, &["whoami", "-o", "json"], None).ok().json();
    assert_eq!(me["cert_serial"], new_serial.as_str(), "{me}");
    let renewals = s.audit_events("client.renew", &["--client", "app"]);
    assert!(
        renewals.iter().any(|e| e["allowed"] == true
            && e["actor"] == "app"
            && e["detail"].as_str().unwrap_or("").contains(&new_serial)),
        "{renewals:?}"
    );

    // No remount: the same process, still serving, and changes still arrive.
    assert_eq!(m.pid(), pid);
    assert!(is_mounted(&m.path));
    assert_eq!(std::fs::read(m.file("db/password")).unwrap(), b"pw-1");
    s.cli_in(&["secret", "rotate", "db/password"], b"pw-2").ok();
    assert!(
        eventually(LONG, || std::fs::read(m.file("db/password")).ok()
            == Some(b"pw-2".to_vec())),
        "the rotation did not reach the renewed mount: {}",
        m.log()
    );
    assert!(m.status()["connected"] == true);
}

#[test]
fn unwritable_credential_files_keep_the_renewed_certificate_in_memory() {
    let s = TestServer::start();
    s.add_secret("db/password", b"pw-1");
    let app = short_lived_client(&s, "ro");
    s.grant("ro", &["ro"], &["db/password"]);
    let old_serial = cert_info(&app.cert).serial;
    let old_key = std::fs::read(&app.key).unwrap();
    // The mount keeps no CAP_DAC_OVERRIDE: root cannot write in a 0555 directory.
    let dir = app.cert.parent().unwrap().to_owned();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).unwrap();
    let m = s.mount_as(&app, &["--renew-after", "1s"]);
    let renewed = eventually(LONG, || {
        m.status()["cert_serial"].as_str() != Some(old_serial.as_str())
    });
    assert!(renewed, "no renewal: {}", m.log());
    assert!(m.log().contains("using it from memory only"), "{}", m.log());
    assert_eq!(
        cert_info(&app.cert).serial,
        old_serial,
        "the files are untouched"
    );
    assert_eq!(std::fs::read(&app.key).unwrap(), old_key);
    s.cli_in(&["secret", "rotate", "db/password"], b"pw-2").ok();
    assert!(eventually(LONG, || std::fs::read(m.file("db/password"))
        .ok()
        == Some(b"pw-2".to_vec())));
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_sec1_or_pkcs1_pair_written_over_the_files_is_taken_up() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &[]);
    let dir = s.tmp.path().join("openssl");
    std::fs::create_dir_all(&dir).unwrap();
    // What cert-manager or an openssl script writes: EC PRIVATE KEY (SEC1)
    // and RSA PRIVATE KEY (PKCS#1), not PKCS#8.
    let kinds: &[(&str, &[&str], &str)] = &[
        (
            "sec1",
            &["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
            "EC PRIVATE KEY",
        ),
        ("pkcs1", &["genrsa", "-traditional"], "RSA PRIVATE KEY"),
    ];
    for (kind, genkey, label) in kinds {
        let key = dir.join(format!("{kind}.key"));
        let csr = dir.join(format!("{kind}.csr"));
        let mut args = genkey.to_vec();
        args.extend_from_slice(&["-out", key.to_str().unwrap()]);
        if *kind == "pkcs1" {
            args.push("2048");
        }
        openssl(&args);
        assert!(std::fs::read_to_string(&key).unwrap().contains(label));
        openssl(&[
            "req",
            "-new",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            "/CN=app",
            "-out",
            csr.to_str().unwrap(),
        ]);
        let out = dir.join(kind);
        s.cli(&[
            "client",
            "renew",
            "app",
            "--csr",
            csr.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
        .ok();
        let new_cert = out.join("app.pem");
        let new_serial = cert_info(&new_cert).serial;
        // Key first, then the certificate, as a rotation would.
        std::fs::copy(&key, &app.key).unwrap();
        std::fs::copy(&new_cert, &app.cert).unwrap();
        assert!(
            eventually(LONG, || m.status()["cert_serial"] == new_serial.as_str()),
            "the {label} pair was not taken up: {}",
            m.log()
        );
        s.cli_in(&["secret", "rotate", "db/password"], kind.as_bytes())
            .ok();
        assert!(
            eventually(LONG, || std::fs::read(m.file("db/password")).ok()
                == Some(kind.as_bytes().to_vec())),
            "no rotation over the {label} pair: {}",
            m.log()
        );
    }
}
