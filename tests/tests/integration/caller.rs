//! The caller check (`secretfs mount --container ID`): only processes of
//! that container may use the mount; everyone else, the host's root
//! included, gets EACCES, and each refusal reaches the audit log. Real runc
//! containers, real mount, real server.

use std::time::Duration;

use crate::common::*;

fn setup() -> (TestServer, Identity) {
    TestServer::start_for_app(&[("db/password", "pw-in-container")])
}

fn reader(s: &TestServer, m: &Mount, script: &str) -> OciBundle {
    let mut b = OciBundle::new(s.tmp.path(), &["/bin/busybox", "sh", "-c", script]);
    b.bind(
        &m.path,
        "/run/secrets",
        &["ro", "nosuid", "nodev", "noexec"],
    );
    b
}

#[test]
fn only_the_named_container_reads_and_refusals_are_audited() {
    let (s, app) = setup();
    let id = format!("secretfs-web-{}", marker("c"));
    let m = s.mount_as(&app, &["--container", &id]);

    // The host's root is refused, the status file (secret names) included.
    let err = std::fs::read(m.file("db/password")).expect_err("host root must be refused");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    let err = std::fs::read_dir(&m.path)
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .expect_err("listing must be refused");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    let err = std::fs::read(m.file(".secretfs/status"))
        .expect_err("the status file is under the caller check by default");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");

    // The container reads, and so does a child it forks.
    let b = reader(
        &s,
        &m,
        "cat /run/secrets/db/password; echo; /bin/busybox sh -c 'cat /run/secrets/db/password'; echo; ls /run/secrets/db",
    );
    let mut c = RuncContainer::start_named(&b, id.clone());
    let r = c.wait(Duration::from_secs(60));
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "pw-in-container\npw-in-container\npassword\n");

    // Another container given the same bind mount is refused.
    let b2 = reader(&s, &m, "cat /run/secrets/db/password");
    let mut other = RuncContainer::start(&b2, "intruder");
    let r = other.wait(Duration::from_secs(60));
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
    assert!(!r.stdout.contains("pw-in-container"));

    // Reported to the audit log.
    let audited = eventually(Duration::from_secs(10), || {
        s.audit_events("mount.refused", &["--client", "app"]).len() >= 3
    });
    assert!(audited, "refusals did not reach the audit log");
    let text = s.cli(&["audit", "--client", "app"]).ok().stdout;
    assert!(
        text.contains("mount.refused") && text.contains("DENIED"),
        "{text}"
    );
}

#[test]
fn the_status_file_is_guarded_unless_public_status() {
    let (s, app) = setup();
    let id = format!("secretfs-web-{}", marker("c"));
    // `--strict-status` is still accepted: it is what the caller check does.
    let m = s.mount_as(&app, &["--container", &id, "--strict-status"]);
    let err = std::fs::read(m.file(".secretfs/status")).expect_err("the host must be refused");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    // The container itself reads it.
    let b = reader(&s, &m, "cat /run/secrets/.secretfs/status");
    let mut c = RuncContainer::start_named(&b, id.clone());
    let r = c.wait(Duration::from_secs(60));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("\"identity\": \"app\""), "{}", r.stdout);

    // `--public-status`: the host reads the status (and its refusal
    // counts), never a secret.
    let m = s.mount_as(&app, &["--container", &id, "--public-status"]);
    assert_eq!(m.status()["identity"], "app");
    let err = std::fs::read(m.file("db/password")).expect_err("host root must be refused");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    assert!(eventually(Duration::from_secs(5), || m.status()
        ["refused_callers"]["count"]
        .as_u64()
        >= Some(1)));
}

#[test]
fn bad_caller_rules_are_refused_before_mounting() {
    let (s, app) = setup();
    let dir = s.tmp.path().join("bad-rule");
    std::fs::create_dir(&dir).unwrap();
    let r = s
        .mount_at(&app, &dir, &["--container", "abc"])
        .err()
        .expect("a short hex id must be refused");
    assert!(r.stderr.contains("at least 12"), "{}", r.stderr);
    assert!(!is_mounted(&dir));
    for flag in ["--strict-status", "--public-status"] {
        let mut cmd = s.cmd_as(&app);
        cmd.arg("mount").arg(&dir).arg(flag);
        run_cmd(cmd, None).fails(2, "--container");
    }
    let mut cmd = s.cmd_as(&app);
    cmd.arg("mount")
        .arg(&dir)
        .args(["--container", "web", "--strict-status", "--public-status"]);
    run_cmd(cmd, None).fails(2, "--public-status");
}

/// The cgroup v2 hierarchy: /sys/fs/cgroup on a v2 host, its `unified`
/// mount on a hybrid one.
fn unified_root() -> std::path::PathBuf {
    let root = std::path::Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return root.to_path_buf();
    }
    let unified = root.join("unified");
    assert!(
        unified.join("cgroup.procs").exists(),
        "no cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified: this test needs one to delegate a subtree"
    );
    unified
}

/// A cgroup subtree delegated to an unprivileged uid, as systemd does for
/// `user@UID.service`; removed (children first) on drop.
struct DelegatedCgroup {
    dir: std::path::PathBuf,
}

impl DelegatedCgroup {
    fn new(uid: u32) -> DelegatedCgroup {
        let dir = unified_root().join(marker("secretfs-delegated"));
        std::fs::create_dir(&dir).unwrap();
        std::fs::create_dir(dir.join("init")).unwrap();
        let chown = std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{uid}:{uid}"))
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success(), "chown -R {uid} {}", dir.display());
        DelegatedCgroup { dir }
    }

    /// The path as /proc/PID/cgroup shows it.
    fn cgroup_path(&self) -> String {
        format!("/{}", self.dir.file_name().unwrap().to_str().unwrap())
    }
}

impl Drop for DelegatedCgroup {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_host_user_cannot_name_its_own_cgroup_after_the_container() {
    // Review finding: a user owning a delegated cgroup subtree makes
    // `<subtree>/<ID>`, moves itself in and looked like the container.
    let (s, app) = setup();
    let id = format!("secretfs-web-{}", marker("c"));
    let m = s.mount_as(
        &app,
        &["--container", &id, "--mode", "0444", "--public-status"],
    );
    // Let uid 1000 reach the mount inside the server's temp dir.
    std::fs::set_permissions(
        s.tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o711),
    )
    .unwrap();
    let cg = DelegatedCgroup::new(1000);
    let file = m.file("db/password");
    // As root: step into the delegated subtree (as a login would), then as
    // uid 1000 make `<subtree>/<id>`, join it, and read.
    let inner = format!(
        "set -e; mkdir {dir}/{id}; echo $$ > {dir}/{id}/cgroup.procs; grep '^0::' /proc/self/cgroup; cat {file}",
        dir = cg.dir.display(),
        file = file.display(),
    );
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "set -e; echo $$ > {dir}/init/cgroup.procs; exec setpriv --reuid=1000 --regid=1000 --clear-groups sh -c \"$0\"",
            dir = cg.dir.display()
        ))
        .arg(&inner);
    let r = run_cmd(cmd, None);
    let joined = format!("0::{}/{id}", cg.cgroup_path());
    assert!(
        r.stdout.contains(&joined),
        "the user process did not get into {joined}\nstdout: {}\nstderr: {}",
        r.stdout,
        r.stderr
    );
    assert!(
        !r.stdout.contains("pw-in-container"),
        "a host user in its own cgroup named after the container read the secret"
    );
    assert_ne!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);

    // Counted in the status, and reported to the audit log.
    // (The status takes the counts over once a second.)
    assert!(eventually(Duration::from_secs(10), || m.status()
        ["refused_callers"]["count"]
        .as_u64()
        >= Some(1)));
    let refused = &m.status()["refused_callers"];
    assert!(
        refused["last"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("unprivileged user"),
        "{refused}"
    );
    assert_eq!(refused["last"]["uid"], 1000, "{refused}");
    let audited = eventually(Duration::from_secs(10), || {
        s.audit_events("mount.refused", &["--client", "app"])
            .iter()
            .any(|e| e.to_string().contains(&id))
    });
    assert!(audited, "the refusal did not reach the audit log");
}
