//! A real container (Debian's runc, a busybox-static rootfs built here)
//! reads its secrets through a secretfs mount bind-mounted read-only.
//! Needs root, /dev/fuse, runc and /bin/busybox (scripts/test.sh installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

/// An OCI bundle: a busybox rootfs and a config.json running `args` as
/// `uid`, with `secrets` bind-mounted read-only at /run/secrets.
fn bundle(dir: &Path, secrets: &Path, uid: u32, args: &[&str]) -> PathBuf {
    let mut b = OciBundle::new(dir, args);
    b.config["process"]["user"] = serde_json::json!({"uid": uid, "gid": uid});
    b.bind(
        secrets,
        "/run/secrets",
        &["ro", "nosuid", "nodev", "noexec"],
    );
    b.write();
    b.path
}

fn run_container(bundle: &Path) -> Run {
    let mut cmd = Command::new("runc");
    cmd.args(["run", "--bundle"])
        .arg(bundle)
        .arg(format!("secretfs-test-{}", marker("c")));
    run_cmd(cmd, None)
}

#[test]
fn a_runc_container_reads_its_secrets_through_a_read_only_bind_mount() {
    let s = TestServer::start();
    s.add_secret("db/password", b"container-pw");
    s.cli_in(
        &[
            "secret",
            "add",
            "app/token",
            "--owner",
            "1000",
            "--mode",
            "0400",
        ],
        b"app-token",
    )
    .ok();
    let app = s.add_client("app");
    s.grant("app", &["app"], &["db/password", "app/token"]);
    let m = s.mount_as(&app, &["--refresh", "1s"]);

    // Root in the container reads the secret byte for byte.
    let b = bundle(
        s.tmp.path(),
        &m.path,
        0,
        &["/bin/busybox", "cat", "/run/secrets/db/password"],
    );
    assert_eq!(run_container(&b).ok().stdout, "container-pw");

    // The container's user 1000 reads the file it owns, and not the 0400 root file.
    let b = bundle(
        s.tmp.path(),
        &m.path,
        1000,
        &[
            "/bin/busybox",
            "sh",
            "-c",
            "cat /run/secrets/app/token; echo; cat /run/secrets/db/password",
        ],
    );
    let r = run_container(&b);
    assert_ne!(r.code, 0);
    assert!(r.stdout.starts_with("app-token"), "{}", r.stdout);
    assert!(!r.stdout.contains("container-pw"));
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);

    // Nothing can be written through the mount, even as root.
    let b = bundle(
        s.tmp.path(),
        &m.path,
        0,
        &["/bin/busybox", "sh", "-c", "echo x > /run/secrets/new"],
    );
    let r = run_container(&b);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("Read-only file system"), "{}", r.stderr);

    // A rotation reaches the running mount; the next container sees it.
    s.cli_in(&["secret", "rotate", "db/password"], b"rotated-pw")
        .ok();
    let b = bundle(
        s.tmp.path(),
        &m.path,
        0,
        &["/bin/busybox", "cat", "/run/secrets/db/password"],
    );
    assert!(
        eventually(std::time::Duration::from_secs(5), || run_container(&b)
            .stdout
            == "rotated-pw"),
        "the container never saw the rotated value"
    );
}
