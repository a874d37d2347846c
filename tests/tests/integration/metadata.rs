//! Metadata that changes: `secret update`, `rotate --expires`, an update
//! reaching a live mount, the README's "Rotate it" for expired secrets,
//! file/directory name conflicts, and past expiries.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use crate::common::*;

const BOUND: Duration = Duration::from_secs(15);

fn describe(s: &TestServer, name: &str) -> serde_json::Value {
    s.cli(&["secret", "describe", name, "-o", "json"])
        .ok()
        .json()
}

#[test]
fn update_changes_each_field_without_a_new_version() {
    let s = TestServer::start();
    s.cli_in(
        &[
            "secret", "add", "db/pw", "--label", "team=a", "--label", "old=x",
        ],
        b"pw-1",
    )
    .ok();
    let out = s
        .cli(&[
            "secret",
            "update",
            "db/pw",
            "--mode",
            "0440",
            "--owner",
            "1234",
            "--group",
            "55",
            "--description",
            "the database password",
            "--label",
            "env=prod",
            "--remove-label",
            "old",
            "--expires",
            "2999-01-01T00:00:00Z",
        ])
        .ok();
    assert!(out.stdout.contains("no new version"), "{}", out.stdout);
    let m = describe(&s, "db/pw");
    assert_eq!(m["mode"], "0440");
    assert_eq!(m["owner"], 1234);
    assert_eq!(m["group"], 55);
    assert_eq!(m["description"], "the database password");
    assert_eq!(m["labels"], serde_json::json!({"team": "a", "env": "prod"}));
    assert_eq!(m["expires_at"], "2999-01-01T00:00:00Z");
    assert_eq!(
        (m["current_version"].as_u64(), m["version_count"].as_u64()),
        (Some(1), Some(1))
    );

    // Back to the mount's defaults; labels replaced; expiry removed.
    s.cli(&[
        "secret",
        "update",
        "db/pw",
        "--owner",
        "none",
        "--group",
        "none",
        "--mode",
        "0",
        "--clear-labels",
        "--label",
        "only=this",
        "--no-expires",
    ])
    .ok();
    let m = describe(&s, "db/pw");
    assert_eq!(m["mode"], serde_json::Value::Null);
    assert_eq!(m["owner"], serde_json::Value::Null);
    assert_eq!(m["group"], serde_json::Value::Null);
    assert_eq!(m["labels"], serde_json::json!({"only": "this"}));
    assert_eq!(m["expires_at"], serde_json::Value::Null);
    assert_eq!(m["version_count"], 1);

    // Audited with what changed, never content.
    let updates = s.audit_events("secret.update", &["--secret", "db/pw"]);
    assert_eq!(updates.len(), 2, "{updates:?}");
    let first = updates[0]["detail"].as_str().unwrap();
    for part in [
        "description",
        "labels -old +env",
        "mode default -> 0440",
        "owner default -> 1234",
        "group default -> 55",
        "expiry none -> 2999-01-01T00:00:00Z",
    ] {
        assert!(first.contains(part), "{part}: {first}");
    }
    assert!(!first.contains("pw-1"));

    // Mistakes are refused with what to do.
    s.cli(&["secret", "update", "db/pw"])
        .fails(1, "nothing to update");
    s.cli(&["secret", "update", "db/pw", "--owner", "root"])
        .fails(2, "none");
    s.cli(&[
        "secret",
        "update",
        "db/pw",
        "--expires",
        "2999-01-01T00:00:00Z",
        "--no-expires",
    ])
    .fails(2, "--no-expires");
    s.cli(&["secret", "update", "missing", "--mode", "0400"])
        .fails(1, "not found");
}

#[test]
fn an_update_reaches_a_live_mount_without_reading_the_content_again() {
    let s = TestServer::start();
    s.add_secret("db/pw", b"pw-1");
    let app = s.add_client("app");
    s.grant("app", &["app"], &["db/pw"]);
    let m = s.mount_as(&app, &[]);
    let file = m.file("db/pw");
    let before = std::fs::metadata(&file).unwrap();
    assert_eq!(
        (before.permissions().mode() & 0o777, before.uid()),
        (0o400, 0)
    );
    let reads_before = s.audit_events("secret.read", &["--secret", "db/pw"]).len();
    assert!(reads_before >= 1);

    s.cli(&[
        "secret", "update", "db/pw", "--mode", "0440", "--owner", "1234",
    ])
    .ok();
    let changed = eventually(BOUND, || {
        std::fs::metadata(&file)
            .map(|a| (a.permissions().mode() & 0o777, a.uid()) == (0o440, 1234))
            .unwrap_or(false)
    });
    assert!(
        changed,
        "the mount did not apply the new mode/owner: {:?}\n{}",
        std::fs::metadata(&file).map(|a| (a.permissions().mode(), a.uid())),
        m.log()
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"pw-1", "same bytes");
    // A metadata change carries no content: nothing more was read.
    let reads_after = s.audit_events("secret.read", &["--secret", "db/pw"]).len();
    assert_eq!(reads_after, reads_before);

    // Back to the mount's default owner: a second update arrives too.
    s.cli(&["secret", "update", "db/pw", "--owner", "none"])
        .ok();
    assert!(eventually(BOUND, || {
        std::fs::metadata(&file)
            .map(|a| a.uid() == 0)
            .unwrap_or(false)
    }));
}

#[test]
fn rotate_sets_or_clears_the_expiry() {
    let s = TestServer::start();
    s.cli_in(
        &["secret", "add", "tok", "--expires", "2990-01-01T00:00:00Z"],
        b"t1",
    )
    .ok();
    s.cli_in(&["secret", "rotate", "tok"], b"t2").ok();
    assert_eq!(
        describe(&s, "tok")["expires_at"],
        "2990-01-01T00:00:00Z",
        "a future expiry is kept by a plain rotation"
    );
    s.cli_in(
        &[
            "secret",
            "rotate",
            "tok",
            "--expires",
            "2995-06-01T00:00:00Z",
        ],
        b"t3",
    )
    .ok();
    assert_eq!(describe(&s, "tok")["expires_at"], "2995-06-01T00:00:00Z");
    s.cli_in(&["secret", "rotate", "tok", "--no-expires"], b"t4")
        .ok();
    let m = describe(&s, "tok");
    assert_eq!(m["expires_at"], serde_json::Value::Null);
    assert_eq!(m["current_version"], 4);
    s.cli_in(
        &[
            "secret",
            "rotate",
            "tok",
            "--expires",
            "2001-01-01T00:00:00Z",
        ],
        b"t5",
    )
    .fails(1, "in the past");
    assert_eq!(
        describe(&s, "tok")["current_version"],
        4,
        "refused: no version"
    );
}

/// README: "an expired secret is still served ... Rotate it." Rotating
/// makes it current (not EXPIRED) again.
#[test]
fn an_expired_secret_rotated_is_no_longer_expired() {
    let s = TestServer::start();
    s.cli_in(
        &[
            "secret",
            "add",
            "api/key",
            "--expires",
            "2020-01-01T00:00:00Z",
            "--force",
        ],
        b"k1",
    )
    .ok();
    let list = s.cli(&["secret", "list"]).ok().stdout;
    assert!(list.contains("EXPIRED"), "{list}");
    assert_eq!(describe(&s, "api/key")["expired"], true);

    s.cli_in(&["secret", "rotate", "api/key"], b"k2").ok();
    let m = describe(&s, "api/key");
    assert_eq!(m["expired"], false, "{m}");
    assert_eq!(m["expires_at"], serde_json::Value::Null);
    let list = s.cli(&["secret", "list"]).ok().stdout;
    assert!(!list.contains("EXPIRED"), "{list}");
    let rotations = s.audit_events("secret.rotate", &["--secret", "api/key"]);
    assert!(
        rotations[0]["detail"]
            .as_str()
            .unwrap()
            .contains("had passed: cleared"),
        "{rotations:?}"
    );
}

#[test]
fn a_past_expiry_is_refused_unless_forced() {
    let s = TestServer::start();
    s.cli_in(
        &["secret", "add", "a", "--expires", "2001-01-01T00:00:00Z"],
        b"x",
    )
    .fails(1, "in the past");
    s.cli(&["secret", "describe", "a"]).fails(1, "not found");
    s.cli_in(
        &[
            "secret",
            "add",
            "a",
            "--expires",
            "2001-01-01T00:00:00Z",
            "--force",
        ],
        b"x",
    )
    .ok();
    s.cli(&["secret", "update", "a", "--expires", "2002-01-01T00:00:00Z"])
        .fails(1, "--force");
    s.cli(&[
        "secret",
        "update",
        "a",
        "--expires",
        "2002-01-01T00:00:00Z",
        "--force",
    ])
    .ok();
    assert_eq!(describe(&s, "a")["expires_at"], "2002-01-01T00:00:00Z");
}

#[test]
fn a_name_that_is_both_file_and_directory_is_refused_at_add() {
    let s = TestServer::start();
    s.add_secret("db", b"1");
    s.cli_in(&["secret", "add", "db/password"], b"2")
        .fails(1, "cannot be both a file and a directory")
        .fails(1, "\"db\"");
    s.add_secret("app/tls/key", b"3");
    let r = s
        .cli_in(&["secret", "add", "app"], b"4")
        .fails(1, "app/tls/key");
    assert!(r.stderr.contains("choose another name"), "{}", r.stderr);
    s.cli_in(&["secret", "add", "app/tls"], b"5")
        .fails(1, "app/tls/key");
    // Neighbours that only share a prefix are fine.
    s.add_secret("dbx", b"6");
    s.add_secret("app/tlsx", b"7");

    // Two adds racing for the two shapes of one path: exactly one wins.
    for round in 0..5 {
        let (file, dir) = (format!("race{round}"), format!("race{round}/inner"));
        let results: Vec<Run> = std::thread::scope(|scope| {
            let a = scope.spawn(|| s.cli_in(&["secret", "add", &file], b"f"));
            let b = scope.spawn(|| s.cli_in(&["secret", "add", &dir], b"d"));
            vec![a.join().unwrap(), b.join().unwrap()]
        });
        let won = results.iter().filter(|r| r.code == 0).count();
        assert_eq!(
            won,
            1,
            "round {round}: {:?}",
            results.iter().map(|r| &r.stderr).collect::<Vec<_>>()
        );
    }
}
