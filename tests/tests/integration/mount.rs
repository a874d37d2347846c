//! The mount end to end: the real binary mounting a real FUSE filesystem
//! against a real server, read through `std::fs`. Needs root and /dev/fuse.

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::*;

const FIVE_S: Duration = Duration::from_secs(5);

fn setup() -> (TestServer, Identity) {
    let s = TestServer::start();
    s.add_secret("db/password", b"pw-1");
    s.cli_in(
        &[
            "secret",
            "add",
            "tls/deep/key.pem",
            "--mode",
            "0440",
            "--owner",
            "1000",
            "--group",
            "2000",
        ],
        b"\x00\x01binary\xffcontent\n",
    )
    .ok();
    s.cli_in(&["secret", "add", "public.txt", "--mode", "0444"], b"hello")
        .ok();
    s.add_secret("not/granted", b"secret-of-others");
    let app = s.add_client("app");
    s.grant(
        "app",
        &["app"],
        &["db/password", "tls/deep/key.pem", "public.txt"],
    );
    (s, app)
}

#[test]
fn the_mount_shows_exactly_the_clients_secrets_with_their_attributes() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &[]);
    assert_eq!(std::fs::read(m.file("db/password")).unwrap(), b"pw-1");
    assert_eq!(
        std::fs::read(m.file("tls/deep/key.pem")).unwrap(),
        b"\x00\x01binary\xffcontent\n"
    );
    assert_eq!(std::fs::read(m.file("public.txt")).unwrap(), b"hello");
    assert!(
        !m.file("not").exists(),
        "a secret without a grant must not show"
    );

    let meta = std::fs::metadata(m.file("tls/deep/key.pem")).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.len()),
        (0o440, 1000, 2000, 17)
    );
    let meta = std::fs::metadata(m.file("db/password")).unwrap();
    assert_eq!(
        (meta.mode() & 0o7777, meta.uid(), meta.gid(), meta.len()),
        (0o400, 0, 0, 4)
    );
    assert!(meta.is_file());
    let dir = std::fs::metadata(m.file("tls/deep")).unwrap();
    assert!(dir.is_dir());
    assert_eq!(dir.mode() & 0o777, 0o555);

    let mut top: Vec<String> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    assert_eq!(top, [".secretfs", "db", "public.txt", "tls"]);

    let status = m.status();
    assert_eq!(status["identity"], "app");
    assert_eq!(status["connected"], true);
    let names: Vec<_> = status["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["db/password", "public.txt", "tls/deep/key.pem"]);
    assert_eq!(status["secrets"][0]["version"], 1);

    // Mount options.
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(&*m.path.to_string_lossy()))
        .unwrap();
    for opt in ["ro", "nosuid", "nodev", "noexec"] {
        assert!(
            line.split(' ').nth(5).unwrap().split(',').any(|o| o == opt),
            "{opt} missing: {line}"
        );
    }
}

/// truncate(2) by path, to size 0. Neither std nor rustix wraps it (std
/// truncates only a file opened for writing, and that open already fails),
/// and the path-based call is what is under test: hence the one unsafe call
/// in the test suite.
#[allow(unsafe_code)]
fn truncate_path(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in the path");
    // SAFETY: `c` is a NUL-terminated string that outlives the call, and
    // truncate only reads it.
    if unsafe { libc::truncate(c.as_ptr(), 0) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[test]
fn every_write_like_call_gets_erofs() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &[]);
    let erofs = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{what}: {e}");
    };
    let f = m.file("db/password");
    erofs(
        std::fs::OpenOptions::new().write(true).open(&f).map(drop),
        "open for write",
    );
    erofs(
        std::fs::OpenOptions::new().append(true).open(&f).map(drop),
        "append",
    );
    erofs(std::fs::write(m.file("new"), b"x"), "create");
    erofs(std::fs::create_dir(m.file("newdir")), "mkdir");
    erofs(std::fs::remove_file(&f), "unlink");
    erofs(std::fs::remove_dir(m.file("tls/deep")), "rmdir");
    erofs(std::fs::rename(&f, m.file("db/other")), "rename");
    erofs(
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)),
        "chmod",
    );
    erofs(std::os::unix::fs::symlink("x", m.file("link")), "symlink");
    erofs(std::fs::hard_link(&f, m.file("hard")), "link");
    erofs(std::os::unix::fs::chown(&f, Some(5), None), "chown");
    erofs(truncate_path(&f), "truncate");
    erofs(
        rustix::fs::setxattr(&f, "user.x", b"v", rustix::fs::XattrFlags::empty())
            .map_err(Into::into),
        "setxattr",
    );
    assert_eq!(std::fs::read(&f).unwrap(), b"pw-1", "nothing changed");
}

#[test]
fn two_mounts_for_two_clients_each_see_only_their_own() {
    let (s, app) = setup();
    let other = s.add_client("other");
    s.grant("others", &["other"], &["not/granted"]);
    let m1 = s.mount_as(&app, &[]);
    let m2 = s.mount_as(&other, &[]);
    assert!(m1.file("db/password").exists() && !m1.file("not/granted").exists());
    assert!(m2.file("not/granted").exists() && !m2.file("db/password").exists());
    assert_eq!(
        std::fs::read(m2.file("not/granted")).unwrap(),
        b"secret-of-others"
    );
    assert_eq!(m2.status()["identity"], "other");
}

#[test]
fn rotation_revocation_grant_and_delete_show_up_after_a_refresh() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &["--refresh", "1s"]);
    let f = m.file("db/password");
    s.cli_in(&["secret", "rotate", "db/password"], b"pw-2-longer")
        .ok();
    assert!(
        eventually(FIVE_S, || std::fs::read(&f).ok().as_deref()
            == Some(b"pw-2-longer")),
        "rotation not seen"
    );
    assert_eq!(
        std::fs::metadata(&f).unwrap().len(),
        11,
        "size follows the new version"
    );
    s.cli(&["secret", "rollback", "db/password", "--to", "1"])
        .ok();
    assert!(
        eventually(FIVE_S, || std::fs::read(&f).ok().as_deref()
            == Some(b"pw-1")),
        "rollback not seen"
    );

    s.cli(&["group", "remove-secret", "app", "public.txt"]).ok();
    assert!(
        eventually(FIVE_S, || !m.file("public.txt").exists()),
        "revoked grant still shows"
    );
    s.cli(&["group", "add-secret", "app", "not/granted"]).ok();
    assert!(
        eventually(FIVE_S, || std::fs::read(m.file("not/granted")).is_ok()),
        "new grant not seen"
    );
    s.cli(&["secret", "delete", "tls/deep/key.pem"]).ok();
    assert!(
        eventually(FIVE_S, || !m.file("tls/deep/key.pem").exists()),
        "deleted secret still shows"
    );
    assert!(
        eventually(FIVE_S, || !m.file("tls").exists()),
        "empty directories go too"
    );
    assert!(eventually(FIVE_S, || m.status()["secrets"]
        .as_array()
        .unwrap()
        .len()
        == 2));
}

#[test]
fn an_open_handle_keeps_the_version_it_opened() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &["--refresh", "1s"]);
    let f = m.file("db/password");
    let mut old = std::fs::File::open(&f).unwrap();
    let mut buf = String::new();
    old.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "pw-1");
    s.cli_in(&["secret", "rotate", "db/password"], b"pw-2").ok();
    assert!(eventually(FIVE_S, || std::fs::read(&f).ok().as_deref()
        == Some(b"pw-2")));
    old.seek(SeekFrom::Start(0)).unwrap();
    buf.clear();
    old.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "pw-1", "the old handle must keep reading its version");
}

#[test]
fn the_kernel_enforces_file_modes_for_other_users() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &[]);
    let cat_as = |uid: u32, path: &Path| {
        let mut cmd = Command::new("cat");
        cmd.arg(path).uid(uid).gid(uid);
        run_cmd(cmd, None)
    };
    // 0400 root-owned: refused to uid 65534.
    cat_as(65534, &m.file("db/password")).fails(1, "Permission denied");
    // 0440 owned by 1000:2000: readable by uid 1000, not by 65534.
    assert_eq!(
        cat_as(1000, &m.file("tls/deep/key.pem")).ok().raw_stdout,
        b"\x00\x01binary\xffcontent\n"
    );
    cat_as(65534, &m.file("tls/deep/key.pem")).fails(1, "Permission denied");
    // 0444: anyone.
    assert_eq!(cat_as(65534, &m.file("public.txt")).ok().stdout, "hello");
}

#[test]
fn sigterm_unmounts_and_leaves_nothing_behind() {
    let (s, app) = setup();
    let mut m = s.mount_as(&app, &[]);
    assert!(is_mounted(&m.path));
    // A file held open must not keep the mount alive or wedge shutdown.
    let _held = std::fs::File::open(m.file("db/password")).unwrap();
    assert_eq!(m.stop(), 0, "log: {}", m.log());
    assert!(!is_mounted(&m.path), "still mounted after SIGTERM");
    assert_eq!(
        std::fs::read_dir(&m.path).unwrap().count(),
        0,
        "mountpoint left non-empty"
    );
}

/// Lifts the core size limit of running process `pid`, so that a crash
/// writes a core (core_pattern "core": into its working directory).
fn allow_cores(pid: u32) {
    use rustix::process::{prlimit, Pid, Resource, Rlimit};
    let pid = Pid::from_raw(pid as i32).expect("a child's pid is not 0");
    let unlimited = Rlimit {
        current: None,
        maximum: None,
    };
    prlimit(Some(pid), Resource::Core, unlimited).expect("lift RLIMIT_CORE");
}

#[test]
fn the_mount_process_is_not_dumpable() {
    use std::os::unix::process::ExitStatusExt;
    let (s, app) = setup();
    // Control: an ordinary process aborted the same way leaves a core, so
    // this machine does write cores and the check below means something.
    let control_dir = s.tmp.path().join("control-core");
    std::fs::create_dir(&control_dir).unwrap();
    let mut sleep = Command::new("sleep");
    sleep.arg("30");
    sleep.current_dir(&control_dir);
    let mut control = sleep.spawn().unwrap();
    allow_cores(control.id());
    std::thread::sleep(Duration::from_millis(100));
    signal(&control, Signal::ABORT);
    let status = control.wait().unwrap();
    assert!(
        status.core_dumped(),
        "this machine does not write core dumps (core_pattern: {:?}), so non-dumpability cannot be checked",
        std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap_or_default()
    );

    let core_dir = s.tmp.path().join("mount-core");
    std::fs::create_dir(&core_dir).unwrap();
    let path = s.tmp.path().join("dump-mnt");
    std::fs::create_dir(&path).unwrap();
    let mut m = s
        .mount_at_with(&app, &path, &[], |cmd| {
            cmd.current_dir(&core_dir);
        })
        .unwrap_or_else(|r| panic!("{}", r.stderr));
    allow_cores(m.pid());
    assert_eq!(std::fs::read(m.file("db/password")).unwrap(), b"pw-1");
    let status = m.signal_and_wait(Signal::ABORT).unwrap();
    assert_eq!(status.signal(), Some(libc::SIGABRT));
    assert!(!status.core_dumped(), "the mount left a core dump");
    assert_eq!(
        std::fs::read_dir(&core_dir).unwrap().count(),
        0,
        "a core file was written"
    );
}

#[test]
fn every_thread_of_the_mount_keeps_only_what_mounting_needs() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &[]);
    // Serving a read starts the FUSE and runtime threads.
    assert_eq!(std::fs::read(m.file("db/password")).unwrap(), b"pw-1");
    // CAP_SYS_ADMIN (21) and CAP_IPC_LOCK (14), nothing else, anywhere.
    let kept = (1u64 << 21) | (1u64 << 14);
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{}/task", m.pid())).unwrap() {
        let Ok(status) = std::fs::read_to_string(task.unwrap().path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        for field in ["CapEff", "CapPrm"] {
            assert_eq!(status_hex(&status, field), kept, "{field} in {status}");
        }
        for field in ["CapInh", "CapAmb"] {
            assert_eq!(status_hex(&status, field), 0, "{field} in {status}");
        }
        assert!(status.contains("NoNewPrivs:\t1"), "{status}");
        threads += 1;
    }
    assert!(
        threads >= 2,
        "only {threads} thread(s): the check saw no runtime"
    );
}

#[test]
fn bad_mountpoints_and_credentials_get_clear_errors() {
    let (s, app) = setup();
    let missing = s.tmp.path().join("does-not-exist");
    let r = s
        .mount_at(&app, &missing, &[])
        .err()
        .expect("mount on a missing dir must fail");
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);

    let file = s.tmp.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let r = s
        .mount_at(&app, &file, &[])
        .err()
        .expect("mount on a file must fail");
    assert!(r.stderr.contains("not a directory"), "{}", r.stderr);

    let full = s.tmp.path().join("full");
    std::fs::create_dir(&full).unwrap();
    std::fs::write(full.join("x"), b"x").unwrap();
    let r = s
        .mount_at(&app, &full, &[])
        .err()
        .expect("mount on a non-empty dir must fail");
    assert!(r.stderr.contains("not empty"), "{}", r.stderr);

    // Unreachable server: gives up at the start timeout and says why.
    let dir = s.tmp.path().join("unreach");
    std::fs::create_dir(&dir).unwrap();
    let mut cmd = s.cmd_as(&app);
    cmd.env("SECRETFS_SERVER", "https://127.0.0.1:1")
        .arg("mount")
        .arg(&dir)
        .args(["--start-timeout", "1s"]);
    let r = run_cmd(cmd, None);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.to_lowercase().contains("refused") || r.stderr.contains("unreachable"),
        "{}",
        r.stderr
    );
    assert!(!is_mounted(&dir));

    // A removed client: the server's reason is passed on.
    let gone = s.add_client("gone");
    s.cli(&["client", "remove", "gone"]).ok();
    let dir = s.tmp.path().join("gone");
    std::fs::create_dir(&dir).unwrap();
    let r = s
        .mount_at(&gone, &dir, &["--start-timeout", "2s"])
        .err()
        .expect("removed client must not mount");
    assert!(r.stderr.contains("was removed"), "{}", r.stderr);

    // Unreadable key file.
    let mut bad = app.clone();
    bad.key = s.tmp.path().join("no.key");
    let dir = s.tmp.path().join("badkey");
    std::fs::create_dir(&dir).unwrap();
    let r = s
        .mount_at(&bad, &dir, &[])
        .err()
        .expect("missing key must fail");
    assert!(r.stderr.contains("no.key"), "{}", r.stderr);
}

#[test]
fn a_client_without_grants_gets_an_empty_mount_that_says_so() {
    let (s, _) = setup();
    let lonely = s.add_client("lonely");
    let m = s.mount_as(&lonely, &[]);
    let entries: Vec<_> = std::fs::read_dir(&m.path)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, [std::ffi::OsString::from(".secretfs")]);
    let status = m.status();
    assert!(status["secrets"].as_array().unwrap().is_empty());
    assert!(
        status.to_string().contains("no grants") || status.to_string().contains("no secrets"),
        "{status}"
    );
}

#[test]
fn a_stale_mount_from_a_crash_is_cleared() {
    let (s, app) = setup();
    let mut m = s.mount_as(&app, &[]);
    let path = m.path.clone();
    m.kill9();
    // The dead mount answers ENOTCONN.
    let e = std::fs::metadata(path.join("db")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTCONN), "{e}");
    let m2 = s
        .mount_at(&app, &path, &[])
        .unwrap_or_else(|r| panic!("remount failed: {}", r.stderr));
    let read = std::fs::read(m2.file("db/password"));
    assert_eq!(
        read.as_deref().ok(),
        Some(&b"pw-1"[..]),
        "{read:?}\nmountinfo: {}\nlog: {}",
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains("fuse"))
            .collect::<Vec<_>>()
            .join("\n"),
        m2.log()
    );
    drop(m);
}

#[test]
fn status_stays_current_under_caching() {
    let (s, app) = setup();
    let m = s.mount_as(&app, &["--refresh", "1s"]);
    let v1 = m.status();
    assert_eq!(v1["secrets"][0]["version"], 1);
    s.cli_in(&["secret", "rotate", "db/password"], b"pw-2").ok();
    assert!(
        eventually(FIVE_S, || m.status()["secrets"][0]["version"] == 2),
        "status did not follow the rotation"
    );
    let mut f = std::fs::File::open(m.file(".secretfs/status")).unwrap();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    let _: serde_json::Value = serde_json::from_str(&text).unwrap();
    let _ = std::io::stdout().flush();
}
