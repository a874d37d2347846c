//! The caller check (`secretfs mount --container ID`): only processes of
//! that container may use the mount; everyone else, the host's root
//! included, gets EACCES, and each refusal reaches the audit log. Real runc
//! containers, real mount, real server.

mod common;

use std::time::Duration;

use common::*;

fn setup() -> (TestServer, Identity) {
    let s = TestServer::start();
    s.add_secret("db/password", b"pw-in-container");
    let app = s.add_client("app");
    s.grant("app", &["app"], &["db/password"]);
    (s, app)
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

    // The host's root is refused, but may read the status file.
    let err = std::fs::read(m.file("db/password")).expect_err("host root must be refused");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    let err = std::fs::read_dir(&m.path)
        .and_then(|d| d.collect::<Result<Vec<_>, _>>())
        .expect_err("listing must be refused");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    assert_eq!(m.status()["identity"], "app");

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

    // Counted in the status, reported to the audit log.
    assert!(eventually(Duration::from_secs(5), || m.status()
        ["refused_callers"]["count"]
        .as_u64()
        >= Some(3)));
    let audited = eventually(Duration::from_secs(10), || {
        let audit = s
            .cli(&["audit", "--client", "app", "-o", "json"])
            .ok()
            .json();
        audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "mount.refused")
            .count()
            >= 3
    });
    assert!(audited, "refusals did not reach the audit log");
    let text = s.cli(&["audit", "--client", "app"]).ok().stdout;
    assert!(
        text.contains("mount.refused") && text.contains("DENIED"),
        "{text}"
    );
}

#[test]
fn strict_status_guards_the_status_file_too() {
    let (s, app) = setup();
    let id = format!("secretfs-web-{}", marker("c"));
    let m = s.mount_as(&app, &["--container", &id, "--strict-status"]);
    let err =
        std::fs::read(m.file(".secretfs/status")).expect_err("strict status must refuse the host");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES), "{err}");
    // The container itself still reads it.
    let b = reader(&s, &m, "cat /run/secrets/.secretfs/status");
    let mut c = RuncContainer::start_named(&b, id);
    let r = c.wait(Duration::from_secs(60));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("\"identity\": \"app\""), "{}", r.stdout);
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
    let mut cmd = s.cmd_as(&app);
    cmd.arg("mount").arg(&dir).arg("--strict-status");
    run_cmd(cmd, None).fails(2, "--container");
}
