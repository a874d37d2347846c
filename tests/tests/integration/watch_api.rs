//! `Secrets.Watch` at the gRPC level, against the real server: what a
//! watcher receives, and that watchers never hold up writers or shutdown.

use std::time::Duration;

use crate::common::*;
use secretfs_proto::v1;
use tonic::Code;

type Events = tonic::Streaming<v1::WatchEvent>;

async fn next(stream: &mut Events) -> Result<v1::WatchEvent, tonic::Status> {
    match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
        Ok(Ok(Some(e))) => Ok(e),
        Ok(Ok(None)) => Err(tonic::Status::cancelled("stream ended")),
        Ok(Err(status)) => Err(status),
        Err(_) => panic!("no watch event within 10 s"),
    }
}

fn upserted(e: &v1::WatchEvent) -> Vec<(String, u64, Vec<u8>)> {
    e.upserts
        .iter()
        .map(|u| {
            let m = u.meta.as_ref().unwrap();
            (m.name.clone(), m.current_version, u.content.clone())
        })
        .collect()
}

fn setup() -> (TestServer, Identity) {
    let s = TestServer::start();
    s.add_secret("a", b"a1");
    s.add_secret("b", b"b1");
    s.add_secret("c", b"c1");
    let app = s.add_client("app");
    s.grant("g", &["app"], &["a", "b"]);
    (s, app)
}

#[test]
fn watch_sends_the_difference_from_what_the_client_holds() {
    let (s, app) = setup();
    rt().block_on(async {
        let mut c = s.secrets_client(&app).await;
        // From nothing: everything readable.
        let mut w = c
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        let first = next(&mut w).await.unwrap();
        assert!(first.initial);
        assert_eq!(
            upserted(&first),
            [
                ("a".into(), 1, b"a1".to_vec()),
                ("b".into(), 1, b"b1".to_vec())
            ]
        );
        let ids: Vec<(String, u64)> = first
            .upserts
            .iter()
            .map(|u| {
                (
                    u.meta.as_ref().unwrap().name.clone(),
                    u.meta.as_ref().unwrap().id,
                )
            })
            .collect();

        // Rotation: one upsert with the new content, a higher revision.
        s.cli_in(&["secret", "rotate", "a"], b"a2").ok();
        let e = next(&mut w).await.unwrap();
        assert!(!e.initial);
        assert_eq!(upserted(&e), [("a".into(), 2, b"a2".to_vec())]);
        assert!(e.revision > first.revision);
        // A secret outside the view changes: nothing is sent for it.
        s.cli_in(&["secret", "rotate", "c"], b"c2").ok();
        // Rollback, revoke and grant.
        s.cli(&["secret", "rollback", "a", "--to", "1"]).ok();
        let e = next(&mut w).await.unwrap();
        assert_eq!(
            upserted(&e),
            [("a".into(), 1, b"a1".to_vec())],
            "the c rotation must not show"
        );
        s.cli(&["group", "remove-secret", "g", "b"]).ok();
        let e = next(&mut w).await.unwrap();
        assert_eq!(
            (upserted(&e), e.removals.clone()),
            (vec![], vec!["b".to_string()])
        );
        s.cli(&["group", "add-secret", "g", "c"]).ok();
        let e = next(&mut w).await.unwrap();
        assert_eq!(upserted(&e), [("c".into(), 2, b"c2".to_vec())]);
        s.cli(&["secret", "delete", "c"]).ok();
        let e = next(&mut w).await.unwrap();
        assert_eq!(e.removals, ["c"]);
        let last = e.revision;

        // Reconnect holding a=1 and a stale b: only the difference comes back.
        let a_id = ids.iter().find(|(n, _)| n == "a").unwrap().1;
        let b_id = ids.iter().find(|(n, _)| n == "b").unwrap().1;
        let known = vec![
            v1::KnownSecret {
                name: "a".into(),
                id: a_id,
                version: 1,
                ..Default::default()
            },
            v1::KnownSecret {
                name: "b".into(),
                id: b_id,
                version: 1,
                ..Default::default()
            },
        ];
        let mut w2 = c
            .watch(v1::WatchRequest {
                known,
                since_revision: last,
            })
            .await
            .unwrap()
            .into_inner();
        let e = next(&mut w2).await.unwrap();
        assert!(e.initial);
        assert!(e.upserts.is_empty(), "a is current and must not be resent");
        assert_eq!(e.removals, ["b"]);
        assert!(e.revision >= last);

        // Every delivered content is audited as a read.
        let reads = s.audit_events("secret.read", &["--client", "app", "--secret", "a"]);
        assert_eq!(reads.len(), 3, "{reads:?}");
    });
}

#[test]
fn removing_the_client_ends_its_watch_with_permission_denied() {
    let (s, app) = setup();
    rt().block_on(async {
        let mut c = s.secrets_client(&app).await;
        let mut w = c
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        next(&mut w).await.unwrap();
        s.cli(&["client", "remove", "app"]).ok();
        let end = next(&mut w).await.expect_err("the stream must end");
        assert_eq!(end.code(), Code::PermissionDenied, "{end:?}");
        assert!(end.message().contains("was removed"), "{end:?}");
        // And a new Watch is refused at once.
        let err = c
            .watch(v1::WatchRequest::default())
            .await
            .expect_err("removed client");
        assert_eq!(err.code(), Code::Unauthenticated);
    });
}

#[test]
fn a_stalled_watcher_never_holds_up_rotations_or_other_watchers() {
    let (s, app) = setup();
    rt().block_on(async {
        let mut c = s.secrets_client(&app).await;
        // This watcher never reads past its first event.
        let _stalled = c
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut live = c
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        next(&mut live).await.unwrap();
        // Large values so the stalled stream's buffers fill up.
        let big = |i: usize| format!("{i:06}-").repeat(100_000 / 7).into_bytes();
        let admin = s.admin.clone();
        let state = s.state.clone();
        let url = s.url();
        let rotations = 60;
        tokio::task::spawn_blocking(move || {
            for i in 0..rotations {
                let mut cmd = std::process::Command::new(bin());
                cmd.env("SECRETFS_SERVER", &url)
                    .env("SECRETFS_CA", state.join("ca.pem"))
                    .env("SECRETFS_CERT", &admin.cert)
                    .env("SECRETFS_KEY", &admin.key)
                    .args(["secret", "rotate", "a"]);
                run_cmd(cmd, Some(&big(i))).ok();
            }
        })
        .await
        .unwrap();
        // The live watcher converges on the last version.
        let want = big(rotations - 1);
        loop {
            let e = next(&mut live).await.unwrap();
            if e.upserts.iter().any(|u| u.content == want) {
                break;
            }
        }
    });
}

#[test]
fn shutdown_is_not_held_up_by_open_watches() {
    let (mut s, app) = setup();
    rt().block_on(async {
        let mut c = s.secrets_client(&app).await;
        let mut w = c
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        next(&mut w).await.unwrap();
        assert_eq!(s.stop(), 0, "graceful stop with a watch open");
        let end = next(&mut w).await.expect_err("the stream must end");
        assert!(
            matches!(
                end.code(),
                Code::Unavailable | Code::Cancelled | Code::Unknown
            ),
            "{end:?}"
        );
    });
}

#[test]
fn revisions_survive_a_restart() {
    let (mut s, app) = setup();
    let rt = rt();
    let before = rt.block_on(async {
        let mut c = s.secrets_client(&app).await;
        let mut w = c
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        next(&mut w).await.unwrap().revision
    });
    assert_eq!(s.stop(), 0);
    s.restart_on("127.0.0.1:0");
    s.cli_in(&["secret", "rotate", "a"], b"a-after").ok();
    rt.block_on(async {
        let mut c = s.secrets_client(&app).await;
        let mut w = c
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        let e = next(&mut w).await.unwrap();
        assert!(
            e.revision > before,
            "revision went from {before} to {}",
            e.revision
        );
    });
}

#[test]
fn refusals_reported_by_a_mount_reach_the_audit_log() {
    let (s, app) = setup();
    rt().block_on(async {
        let mut c = s.secrets_client(&app).await;
        let refusal = |pid: u32, path: &str| v1::Refusal {
            at_ms: 0,
            pid,
            uid: 1000,
            cgroup: "0::/user.slice/other".into(),
            path: path.into(),
            reason: "not in container web".into(),
        };
        c.report_refusals(v1::ReportRefusalsRequest {
            refusals: vec![refusal(4242, "a"), refusal(4243, ".secretfs/status")],
        })
        .await
        .unwrap();
        let too_many = v1::ReportRefusalsRequest {
            refusals: (0..1001).map(|i| refusal(i, "a")).collect(),
        };
        let err = c
            .report_refusals(too_many)
            .await
            .expect_err("over the limit");
        assert_eq!(err.code(), Code::InvalidArgument);
    });
    let refused = s.audit_events("mount.refused", &["--client", "app"]);
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert_eq!(refused[0]["secret"], "a");
    assert_eq!(refused[0]["allowed"], false);
    assert!(
        refused[0]["detail"]
            .as_str()
            .unwrap()
            .contains("pid 4242 uid 1000"),
        "{refused:?}"
    );
    assert!(
        refused[1]["detail"]
            .as_str()
            .unwrap()
            .contains("path .secretfs/status"),
        "{refused:?}"
    );
}
