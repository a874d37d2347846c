//! End-to-end: a real FUSE mount of a static snapshot, read with std::fs.
//!
//! Needs root and /dev/fuse (CI has both). Without them it fails with the
//! reason; it never passes silently.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use secretfs_mount::{StaticMount, StaticSecret};

mod common;
use common::bounded;

const GRACE: Duration = Duration::from_secs(2);

fn mount(dir: &Path, secrets: Vec<StaticSecret>) -> StaticMount {
    StaticMount::mount(dir, 1000, 1000, 0o400, secrets)
        .unwrap_or_else(|e| panic!("this test needs a working FUSE mount (root, /dev/fuse): {e}"))
}

fn v1() -> Vec<StaticSecret> {
    let mut token = StaticSecret::new(2, 1, "token", b"tok-123");
    token.mode = 0o440;
    token.owner = Some(1234);
    token.created_at = 1_700_000_000;
    vec![
        StaticSecret::new(1, 1, "db/password", b"old-password"),
        token,
        StaticSecret::new(3, 1, "api/key", b"k"),
        StaticSecret::new(4, 1, ".hidden", b"never"),
    ]
}

fn errno(e: std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

fn is_listed_in_mountinfo(dir: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = dir.to_str().unwrap();
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

#[test]
fn serves_rotates_deletes_and_unmounts() {
    bounded(Duration::from_secs(60), || {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let mut m = mount(&dir, v1());

        // Mount options as the kernel sees them.
        let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let line = info
            .lines()
            .find(|l| l.split(' ').nth(4) == dir.to_str())
            .expect("mount listed in mountinfo");
        let per_mount = line.split(' ').nth(5).unwrap();
        for opt in ["ro", "nosuid", "nodev", "noexec"] {
            assert!(
                per_mount.split(',').any(|o| o == opt),
                "{opt} missing: {line}"
            );
        }
        assert!(
            line.contains("default_permissions") && line.contains("allow_other"),
            "{line}"
        );
        assert!(line.contains(" - fuse secretfs "), "{line}");

        // Layout, contents, attributes.
        assert_eq!(fs::read(dir.join("db/password")).unwrap(), b"old-password");
        assert_eq!(fs::read(dir.join("token")).unwrap(), b"tok-123");
        let tok = fs::metadata(dir.join("token")).unwrap();
        assert_eq!(tok.permissions().mode() & 0o7777, 0o440);
        assert_eq!((tok.uid(), tok.gid()), (1234, 1000));
        assert_eq!(tok.len(), 7);
        assert_eq!(tok.mtime(), 1_700_000_000);
        let pw = fs::metadata(dir.join("db/password")).unwrap();
        assert_eq!(pw.permissions().mode() & 0o7777, 0o400);
        let db = fs::metadata(dir.join("db")).unwrap();
        assert!(db.is_dir());
        assert_eq!(db.permissions().mode() & 0o7777, 0o555);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [".secretfs", "api", "db", "token"]);
        assert!(!dir.join(".hidden").exists());

        // Status JSON.
        let status: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(".secretfs/status")).unwrap()).unwrap();
        assert_eq!(status["connected"], true);
        assert_eq!(status["skipped"][0]["name"], ".hidden");
        assert_eq!(status["secrets"].as_array().unwrap().len(), 3);

        // Read-only everywhere.
        let erofs = libc::EROFS;
        assert_eq!(
            errno(fs::write(dir.join("db/password"), b"x").unwrap_err()),
            erofs
        );
        assert_eq!(errno(fs::write(dir.join("new"), b"x").unwrap_err()), erofs);
        assert_eq!(
            errno(fs::remove_file(dir.join("token")).unwrap_err()),
            erofs
        );
        assert_eq!(errno(fs::create_dir(dir.join("d")).unwrap_err()), erofs);
        assert_eq!(
            errno(fs::rename(dir.join("token"), dir.join("t2")).unwrap_err()),
            erofs
        );
        let perms = fs::Permissions::from_mode(0o777);
        assert_eq!(
            errno(fs::set_permissions(dir.join("token"), perms).unwrap_err()),
            erofs
        );
        // The filesystem implements none of these: the `ro` mount answers.
        assert_eq!(errno(fs::remove_dir(dir.join("db")).unwrap_err()), erofs);
        assert_eq!(
            errno(std::os::unix::fs::symlink("x", dir.join("link")).unwrap_err()),
            erofs
        );
        assert_eq!(
            errno(fs::hard_link(dir.join("token"), dir.join("hard")).unwrap_err()),
            erofs
        );
        assert_eq!(
            errno(std::os::unix::fs::chown(dir.join("token"), Some(5), None).unwrap_err()),
            erofs
        );
        let opened = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("db/password"));
        assert_eq!(errno(opened.unwrap_err()), erofs);
        let xattr = rustix::fs::setxattr(
            dir.join("token").as_path(),
            "user.x",
            b"v",
            rustix::fs::XattrFlags::empty(),
        );
        assert_eq!(xattr, Err(rustix::io::Errno::ROFS));
        let times = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
            last_modification: rustix::fs::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            },
        };
        let utimes = rustix::fs::utimensat(
            rustix::fs::CWD,
            dir.join("token").as_path(),
            &times,
            rustix::fs::AtFlags::empty(),
        );
        assert_eq!(utimes, Err(rustix::io::Errno::ROFS));
        assert_eq!(fs::read(dir.join("db/password")).unwrap(), b"old-password");

        // Rotation: new opens see the new version, an open handle keeps the old.
        let mut old = fs::File::open(dir.join("db/password")).unwrap();
        let mut first = [0u8; 3];
        old.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"old");
        let mut v2 = v1();
        v2[0] = StaticSecret::new(1, 2, "db/password", b"new-password-longer");
        v2.remove(2); // api/key deleted
        m.update(v2);

        assert_eq!(
            fs::read(dir.join("db/password")).unwrap(),
            b"new-password-longer"
        );
        assert_eq!(fs::metadata(dir.join("db/password")).unwrap().len(), 19);
        let mut rest = Vec::new();
        old.seek(SeekFrom::Start(0)).unwrap();
        old.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"old-password", "an open handle keeps its version");
        drop(old);

        // Deletion: the file and its now-empty directory are gone.
        assert_eq!(
            errno(fs::metadata(dir.join("api/key")).unwrap_err()),
            libc::ENOENT
        );
        assert!(!dir.join("api").exists());
        let status: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.join(".secretfs/status")).unwrap()).unwrap();
        let pw = status["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "db/password")
            .unwrap()
            .clone();
        assert_eq!(pw["version"], 2);

        // Clean unmount: a plain empty directory again.
        m.unmount(GRACE);
        assert!(!is_listed_in_mountinfo(&dir), "still mounted");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
    });
}

#[test]
fn unmount_with_an_open_file_leaves_no_dead_mount() {
    bounded(Duration::from_secs(60), || {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let m = mount(&dir, v1());
        let open = fs::File::open(dir.join("token")).unwrap();

        m.unmount(Duration::from_millis(300));
        // The path is free at once (lazy detach), not ENOTCONN.
        assert!(!is_listed_in_mountinfo(&dir), "still mounted");
        fs::metadata(&dir).expect("mountpoint usable after unmount");
        drop(open);

        // And it can be mounted again at the same place.
        let m = mount(&dir, v1());
        assert_eq!(fs::read(dir.join("token")).unwrap(), b"tok-123");
        m.unmount(GRACE);
    });
}

fn unreachable_opts(dir: &Path) -> secretfs_mount::MountOptions {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = key.cert.pem().into_bytes();
    let connect = secretfs_proto::ConnectConfig {
        // Port 1 on loopback: connection refused at once.
        server: "127.0.0.1:1".into(),
        ca_pem: cert_pem.clone(),
        cert_pem,
        key_pem: key.signing_key.serialize_pem().into_bytes().into(),
        connect_timeout: Duration::from_secs(1),
    };
    let mut opts = secretfs_mount::MountOptions::new(dir, connect);
    opts.start_timeout = Duration::from_millis(1500);
    opts
}

#[test]
fn run_gives_up_on_an_unreachable_server_without_mounting() {
    bounded(Duration::from_secs(30), || {
        let tmp = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let fut = secretfs_mount::run(unreachable_opts(tmp.path()), std::future::pending());
        // The CLI spawns `run` on the runtime: it must be Send.
        let err = rt.block_on(rt.spawn(fut)).unwrap().unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, secretfs_mount::MountError::StartTimeout { .. }),
            "{text}"
        );
        assert!(
            text.contains("127.0.0.1:1") && text.contains("Nothing was mounted"),
            "{text}"
        );
        assert!(!is_listed_in_mountinfo(tmp.path()));
    });
}

#[test]
fn run_explains_an_unusable_key() {
    bounded(Duration::from_secs(30), || {
        let tmp = tempfile::tempdir().unwrap();
        let mut opts = unreachable_opts(tmp.path());
        opts.connect.key_pem = b"not a key".to_vec().into();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let err = rt
            .block_on(secretfs_mount::run(opts, std::future::pending()))
            .unwrap_err();
        assert!(
            matches!(err, secretfs_mount::MountError::Connect(_)),
            "{err}"
        );
        assert!(err.to_string().contains("--key"), "{err}");
    });
}

#[test]
fn run_outside_a_multi_thread_runtime_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt
        .block_on(secretfs_mount::run(unreachable_opts(tmp.path()), async {}))
        .unwrap_err();
    assert!(
        matches!(err, secretfs_mount::MountError::NoRuntime),
        "{err}"
    );
}
