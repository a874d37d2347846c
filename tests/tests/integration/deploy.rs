//! The shipped deployment files: the systemd units pass
//! `systemd-analyze verify` (against the binary just built) and keep their
//! hardening; the Dockerfile pins its base images.
//! Needs systemd-analyze (Debian's `systemd` package; scripts/test.sh
//! installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn systemd_analyze() -> Command {
    let found = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .unwrap();
    assert!(
        found.status.success(),
        "systemd-analyze is missing: the unit tests need Debian's systemd package (scripts/test.sh installs it)"
    );
    Command::new("systemd-analyze")
}

/// The units copied to a temp dir with ExecStart pointing at the built
/// binary, so that verify checks a command that exists.
fn units(dir: &Path) -> Vec<PathBuf> {
    let bin = bin();
    let mut out = Vec::new();
    for name in ["secretfs-server.service", "secretfs-mount@.service"] {
        let text = repo_file(&format!("deploy/systemd/{name}"));
        assert!(
            text.contains("/usr/local/bin/secretfs "),
            "{name} should run /usr/local/bin/secretfs"
        );
        let text = text.replace("/usr/local/bin/secretfs", bin.to_str().unwrap());
        std::fs::write(dir.join(name), text).unwrap();
        out.push(dir.join(name));
    }
    out
}

/// `unit` as systemd-analyze sees it: the template as an instance.
fn instance(unit: &Path) -> PathBuf {
    let name = unit.file_name().unwrap().to_str().unwrap();
    unit.with_file_name(name.replace("@.service", "@web-1.service"))
}

fn analyze(args: &[&str], unit: &Path) -> Run {
    let mut cmd = systemd_analyze();
    cmd.args(args).arg(instance(unit));
    run_cmd(cmd, None)
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let tmp = tempfile::tempdir().unwrap();
    for unit in units(tmp.path()) {
        let r = analyze(&["verify"], &unit);
        assert_eq!(r.code, 0, "{}: {}", unit.display(), r.stderr);
        // Unknown keys, bad syscall groups and missing commands are only
        // warnings to verify: none is acceptable.
        assert!(
            r.stderr.trim().is_empty() && r.stdout.trim().is_empty(),
            "{}: systemd-analyze verify complained:\n{}{}",
            unit.display(),
            r.stdout,
            r.stderr
        );
    }
}

#[test]
fn verify_catches_what_this_test_relies_on_it_to_catch() {
    // A unit with a typo and a missing binary must not pass the check
    // above, or that check proves nothing.
    let tmp = tempfile::tempdir().unwrap();
    let unit = tmp.path().join("broken.service");
    std::fs::write(
        &unit,
        "[Service]\nExecStart=/nonexistent/secretfs server run\nNoNewPrivilegez=yes\n",
    )
    .unwrap();
    let r = analyze(&["verify"], &unit);
    assert!(r.code != 0 || !r.stderr.trim().is_empty(), "{r:?}");
    assert!(r.stderr.contains("NoNewPrivilegez"), "{}", r.stderr);
    assert!(r.stderr.contains("/nonexistent/secretfs"), "{}", r.stderr);
}

/// systemd's own exposure score (0 = locked down, 10 = exposed).
fn exposure(unit: &Path) -> f64 {
    let r = analyze(&["security", "--offline=true", "--no-pager"], unit);
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level for {}: {r:?}", unit.display()));
    line.split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable exposure line: {line}"))
}

#[test]
fn the_units_are_hardened() {
    let tmp = tempfile::tempdir().unwrap();
    let units = units(tmp.path());
    let server = std::fs::read_to_string(&units[0]).unwrap();
    let mount = std::fs::read_to_string(&units[1]).unwrap();

    // The server: no privilege at all, as its own user.
    for line in [
        "User=secretfs",
        "StateDirectory=secretfs",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "MemoryDenyWriteExecute=yes",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "LimitCORE=0",
    ] {
        assert!(server.contains(line), "server unit lacks {line:?}");
    }
    let score = exposure(&units[0]);
    assert!(score <= 2.0, "server exposure {score} (was 1.5)");

    // The mount: only the capabilities it needs, /dev/fuse, no core files.
    for line in [
        "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_IPC_LOCK\n",
        "NoNewPrivileges=yes",
        "DeviceAllow=/dev/fuse rw",
        "DevicePolicy=closed",
        "LimitMEMLOCK=",
        "LimitCORE=0",
        "ExecStartPre=/bin/mkdir -p -m 0755 /run/secretfs/%i",
        "/etc/secretfs/%i/ca.pem",
        "/etc/secretfs/%i/%i.pem",
        "/etc/secretfs/%i/%i.key",
        "EnvironmentFile=-/etc/secretfs/%i.env",
    ] {
        assert!(mount.contains(line), "mount unit lacks {line:?}");
    }
    // Each of these gives the service a private mount namespace, where the
    // FUSE mount would be invisible to the host and its containers.
    for key in [
        "ProtectSystem=",
        "ProtectHome=",
        "PrivateTmp=",
        "PrivateDevices=",
        "PrivateMounts=",
        "ProtectKernelTunables=",
        "ProtectKernelModules=",
        "ProtectKernelLogs=",
        "ProtectControlGroups=",
        "ProtectProc=",
        "ReadWritePaths=",
        "ReadOnlyPaths=",
        "InaccessiblePaths=",
        "TemporaryFileSystem=",
        "BindPaths=",
        "RootDirectory=",
        "MountFlags=",
    ] {
        assert!(
            !mount.lines().any(|l| l.starts_with(key)),
            "mount unit sets {key}: a private mount namespace hides the FUSE mount from the host"
        );
    }
    let score = exposure(&units[1]);
    assert!(score <= 5.0, "mount exposure {score} (was 4.2)");
}

#[test]
fn the_dockerfile_pins_its_base_images_and_runs_the_server_unprivileged() {
    let text = repo_file("deploy/Dockerfile");
    let froms: Vec<&str> = text
        .lines()
        .filter(|l| l.trim_start().to_ascii_uppercase().starts_with("FROM "))
        .collect();
    assert!(froms.len() >= 2, "a multi-stage build: {froms:?}");
    for from in &froms {
        let image = from.split_whitespace().nth(1).unwrap();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or("");
        assert!(
            tag.chars().any(|c| c.is_ascii_digit()) && !tag.contains("latest"),
            "base image not pinned to a version tag: {from}"
        );
    }
    assert!(text.contains("ENTRYPOINT [\"secretfs\"]"), "entrypoint");
    assert!(
        text.contains("\nUSER secretfs"),
        "the server runs as secretfs"
    );
}
