//! The audit log for humans: filters by action and outcome, `--follow`,
//! details printed as written, and removals that say what they removed.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use secretfs_proto::v1;

use crate::common::*;

const BOUND: Duration = Duration::from_secs(20);

fn actions(events: &serde_json::Value) -> Vec<(String, bool)> {
    events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["allowed"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn audit_filters_by_action_and_outcome() {
    let s = TestServer::start();
    s.add_secret("mine", b"m");
    s.add_secret("theirs", b"t");
    let app = s.add_client("app");
    s.grant("g", &["app"], &["mine"]);
    s.cli_as(&app, &["read", "mine"], None).ok();
    s.cli_as(&app, &["read", "theirs"], None).fails(1, "theirs");

    let refused_reads = s
        .cli(&[
            "audit",
            "--action",
            "secret.read",
            "--outcome",
            "refused",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(actions(&refused_reads), [("secret.read".into(), false)]);
    assert_eq!(refused_reads[0]["secret"], "theirs");
    let allowed_reads = s
        .cli(&[
            "audit",
            "--action",
            "secret.read",
            "--outcome",
            "allowed",
            "-o",
            "json",
        ])
        .ok()
        .json();
    assert_eq!(actions(&allowed_reads), [("secret.read".into(), true)]);
    let family = s
        .cli(&["audit", "--action", "secret.*", "-o", "json"])
        .ok()
        .json();
    let names: Vec<_> = actions(&family).into_iter().map(|(a, _)| a).collect();
    assert!(names.iter().all(|a| a.starts_with("secret.")), "{names:?}");
    assert!(names.contains(&"secret.create".to_owned()));
    assert!(names.contains(&"secret.read".to_owned()));
    // Refused of any action: the refused read, and the admin-only call.
    s.cli_as(&app, &["secret", "list"], None).fails(1, "admin");
    let refused = s
        .cli(&["audit", "--outcome", "refused", "-o", "json"])
        .ok()
        .json();
    assert!(actions(&refused).iter().all(|(_, ok)| !ok));
    assert_eq!(actions(&refused).len(), 2, "{refused}");

    s.cli(&["audit", "--action", "SECRET READ"])
        .fails(1, "not an audit action");
    s.cli(&["audit", "--outcome", "maybe"]).fails(2, "maybe");
}

#[test]
fn audit_follow_prints_new_events_until_interrupted() {
    let s = TestServer::start();
    s.add_secret("before", b"b");
    let mut cmd = s.cmd_as(&s.admin.clone());
    cmd.args([
        "audit",
        "--follow",
        "--action",
        "secret.create",
        "-o",
        "json",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next_secret = |rx: &mpsc::Receiver<String>| -> Option<String> {
        let line = rx.recv_timeout(BOUND).ok()?;
        let e: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("follow -o json prints JSON lines ({e}): {line}"));
        Some(e["secret"].as_str().unwrap_or_default().to_owned())
    };
    // What was there first, then what is written while it follows.
    assert_eq!(next_secret(&rx).as_deref(), Some("before"));
    s.add_secret("later", b"l");
    s.add_secret("later2", b"l");
    assert_eq!(next_secret(&rx).as_deref(), Some("later"));
    assert_eq!(next_secret(&rx).as_deref(), Some("later2"));
    // Ctrl-C ends it cleanly.
    signal(&child, rustix::process::Signal::INT);
    let out = wait_bounded(child, BOUND);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn details_are_printed_as_written_with_control_characters_escaped() {
    let s = TestServer::start();
    s.add_secret("a", b"a");
    let app = s.add_client("app");
    s.grant("g", &["app"], &["a"]);
    rt().block_on(async {
        let mut c = s.secrets_client(&app).await;
        c.report_refusals(v1::ReportRefusalsRequest {
            refusals: vec![v1::Refusal {
                at_ms: 0,
                pid: 7,
                uid: 1000,
                cgroup: "0::/other\n\u{1b}[2J".into(),
                path: "a".into(),
                reason: "caller is not in the mount's container \"web\"".into(),
            }],
        })
        .await
        .unwrap();
    });
    let text = s.cli(&["audit", "--action", "mount.refused"]).ok().stdout;
    assert!(
        text.contains("caller is not in the mount's container \"web\""),
        "{text}"
    );
    assert!(!text.contains("mount\\'s"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no raw escape reaches a terminal: {text}"
    );
    assert!(text.contains("\\n"), "{text}");
    let json = s
        .cli(&["audit", "--action", "mount.refused", "-o", "json"])
        .ok()
        .json();
    let detail = json[0]["detail"].as_str().unwrap();
    assert!(
        detail.ends_with("caller is not in the mount's container \"web\""),
        "{detail}"
    );
}

#[test]
fn removals_record_what_they_removed() {
    let s = TestServer::start();
    for n in ["s1", "s2", "s3"] {
        s.add_secret(n, b"x");
    }
    s.cli_in(&["secret", "rotate", "s1"], b"y").ok();
    for c in ["c1", "c2"] {
        s.add_client(c);
    }
    s.grant("team", &["c1", "c2"], &["s1", "s2", "s3"]);
    s.grant("other", &["c1"], &["s1"]);
    s.cli(&["group", "remove", "team"]).ok();
    let removed = s.audit_events("group.remove", &[]);
    assert_eq!(
        removed[0]["detail"],
        "removed with 2 clients (c1, c2) and 3 secrets (s1, s2, s3)"
    );
    s.cli(&["client", "remove", "c1"]).ok();
    let removed = s.audit_events("client.remove", &["--client", "c1"]);
    assert_eq!(removed[0]["detail"], "was in groups other");
    s.cli(&["secret", "delete", "s1"]).ok();
    let removed = s.audit_events("secret.delete", &["--secret", "s1"]);
    assert_eq!(
        removed[0]["detail"],
        "removed 2 versions; granted to groups other"
    );
    // The text view shows the same.
    let text = s.cli(&["audit", "--action", "group.remove"]).ok().stdout;
    assert!(text.contains("2 clients (c1, c2)"), "{text}");
}
