//! The JSON shown at `.secretfs/status`: who the mount is, where it syncs
//! from, how fresh its copy is, and which names it could not show.
//!
//! It names secrets and versions, never their content. Every time in it is
//! RFC 3339 in UTC, to the second (`2026-11-29T15:53:10Z`).

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::snapshot::Snapshot;
use secretfs_proto::cert::{rfc3339, CertInfo};

use crate::tree::Force;

/// What the sync loop knows about its connection; the snapshot supplies
/// the rest.
#[derive(Clone, Debug, Default)]
pub struct SyncState {
    /// Client name from `WhoAmI`, if the server told us.
    pub identity: Option<String>,
    pub server: String,
    /// The endpoint events come from now (`https://name:port (ip:port)`).
    pub server_in_use: Option<String>,
    /// A Watch stream is open and its events are applied as they come:
    /// what is shown is current.
    pub connected: bool,
    /// When the last event (or first sync) was applied.
    pub last_sync: Option<SystemTime>,
    /// The server's revision of the last applied event.
    pub revision: Option<u64>,
    /// When the connection was lost: the last moment we knew we were
    /// current. `None` while connected.
    pub disconnected_since: Option<SystemTime>,
    /// `--max-stale`, if set.
    pub max_stale: Option<Duration>,
    /// Cut off longer than `max_stale`: secrets answer EIO.
    pub fail_closed: bool,
    /// Why the last attempt failed, while it keeps failing.
    pub last_error: Option<String>,
    /// Set when the server refused this client; the mount is then empty.
    pub refused: Option<String>,
    /// With the caller check on: the processes it refused.
    pub refused_callers: Option<crate::guard::RefusalCounts>,
    /// The client certificate in use, when it could be read.
    pub cert: Option<CertInfo>,
    /// `--force-uid`/`--force-gid`/`--force-mode`, as the tree applies them.
    pub force: Force,
}

#[derive(Serialize)]
struct StatusJson<'a> {
    identity: Option<&'a str>,
    server: &'a str,
    /// The address in use now (one of `server`'s).
    #[serde(skip_serializing_if = "Option::is_none")]
    server_in_use: Option<&'a str>,
    connected: bool,
    last_sync: Option<String>,
    /// 0 while connected (changes arrive as they commit); otherwise the
    /// seconds since the connection was lost.
    seconds_stale: Option<u64>,
    revision: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disconnected_since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_stale_seconds: Option<u64>,
    fail_closed: bool,
    /// The client certificate in use: serial (hex) and expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_serial: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cert_not_after: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    force_uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    force_gid: Option<u32>,
    /// Octal, as given (`"0440"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    force_mode: Option<String>,
    secrets: Vec<SecretJson<'a>>,
    skipped: Vec<SkippedJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
    /// With `--container`/`--allow-cgroup`: how many requests the caller
    /// check refused, and the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    refused_callers: Option<&'a crate::guard::RefusalCounts>,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

#[derive(Serialize)]
struct SecretJson<'a> {
    name: &'a str,
    version: u64,
}

#[derive(Serialize)]
struct SkippedJson<'a> {
    name: &'a str,
    reason: &'a str,
}

/// Renders the status file (pretty JSON and a trailing newline, for `cat`).
pub fn render(state: &SyncState, snap: &Snapshot, now: SystemTime) -> Vec<u8> {
    let note = if state.fail_closed {
        Some(format!(
            "cut off from the server for more than {} s (--max-stale): every secret read fails \
             with EIO until the connection is back",
            state.max_stale.map_or(0, |d| d.as_secs())
        ))
    } else if let Some(why) = &state.refused {
        Some(format!(
            "the server refused this client ({why}); every secret was removed from the mount. \
             Ask an operator whether the client was removed or disabled, or issue it a new certificate"
        ))
    } else if state.last_sync.is_some() && snap.files().is_empty() && snap.skipped().is_empty() {
        Some(
            "this client has no secrets granted: ask an operator to add it to a group that holds secrets"
                .to_owned(),
        )
    } else {
        None
    };
    let json = StatusJson {
        identity: state.identity.as_deref(),
        server: &state.server,
        server_in_use: state.server_in_use.as_deref(),
        connected: state.connected,
        last_sync: state.last_sync.map(rfc3339),
        seconds_stale: if state.connected {
            state.last_sync.map(|_| 0)
        } else {
            state
                .disconnected_since
                .or(state.last_sync)
                .map(|t| now.duration_since(t).map_or(0, |d| d.as_secs()))
        },
        revision: state.revision,
        disconnected_since: state.disconnected_since.map(rfc3339),
        max_stale_seconds: state.max_stale.map(|d| d.as_secs()),
        fail_closed: state.fail_closed,
        cert_serial: state.cert.as_ref().map(|c| c.serial.as_str()),
        cert_not_after: state.cert.as_ref().map(|c| rfc3339(c.not_after)),
        force_uid: state.force.uid,
        force_gid: state.force.gid,
        force_mode: state.force.mode.map(|m| format!("{m:04o}")),
        secrets: snap
            .files()
            .iter()
            .map(|f| SecretJson {
                name: &f.name,
                version: f.version,
            })
            .collect(),
        skipped: snap
            .skipped()
            .iter()
            .map(|s| SkippedJson {
                name: &s.name,
                reason: &s.reason,
            })
            .collect(),
        last_error: state.last_error.as_deref(),
        refused_callers: state.refused_callers.as_ref(),
        note,
    };
    let mut out = serde_json::to_vec_pretty(&json).expect("status serialises");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use serde_json::Value;

    use super::*;
    use crate::snapshot::tests::file;

    fn parse(bytes: &[u8]) -> Value {
        assert_eq!(bytes.last(), Some(&b'\n'));
        serde_json::from_slice(bytes).unwrap()
    }

    #[test]
    fn connected_with_secrets_and_skips() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let state = SyncState {
            identity: Some("web-1".into()),
            server: "https://s:7443".into(),
            connected: true,
            last_sync: Some(t0),
            ..Default::default()
        };
        let snap = Snapshot::build(vec![
            file(1, 4, "db/password", b"never shown"),
            file(2, 1, ".env", b"x"),
        ]);
        let raw = render(&state, &snap, t0 + Duration::from_secs(12));
        assert!(!String::from_utf8_lossy(&raw).contains("never shown"));
        let v = parse(&raw);
        assert_eq!(v["identity"], "web-1");
        assert_eq!(v["server"], "https://s:7443");
        assert_eq!(v["connected"], true);
        assert_eq!(v["last_sync"], "2023-11-14T22:13:20Z");
        assert_eq!(v["seconds_stale"], 0, "connected: current");
        assert_eq!(v["fail_closed"], false);
        assert_eq!(v["secrets"][0]["name"], "db/password");
        assert_eq!(v["secrets"][0]["version"], 4);
        assert_eq!(v["skipped"][0]["name"], ".env");
        assert!(v["skipped"][0]["reason"].as_str().unwrap().contains("'.'"));
        assert!(v.get("note").is_none());
        assert!(v.get("last_error").is_none());
        assert!(v.get("cert_serial").is_none(), "no certificate read");
        assert!(v.get("force_mode").is_none());
    }

    #[test]
    fn certificate_and_forced_attributes() {
        let (cert, _) = crate::renewal::tests::cert_and_key(10);
        let info = CertInfo::parse(cert.as_bytes()).unwrap();
        let state = SyncState {
            cert: Some(info.clone()),
            force: Force {
                uid: Some(1000),
                gid: None,
                mode: Some(0o440),
            },
            ..Default::default()
        };
        let v = parse(&render(&state, &Snapshot::empty(), UNIX_EPOCH));
        assert_eq!(v["cert_serial"], "4a01ff");
        assert_eq!(v["cert_not_after"], rfc3339(info.not_after));
        assert!(v["cert_not_after"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["force_uid"], 1000);
        assert!(v.get("force_gid").is_none());
        assert_eq!(v["force_mode"], "0440");
    }

    #[test]
    fn no_grants_gets_a_note() {
        let state = SyncState {
            last_sync: Some(UNIX_EPOCH),
            connected: true,
            ..Default::default()
        };
        let v = parse(&render(&state, &Snapshot::empty(), UNIX_EPOCH));
        assert!(v["note"].as_str().unwrap().contains("no secrets granted"));
        assert_eq!(v["identity"], Value::Null);
    }

    #[test]
    fn disconnected_and_refused() {
        let state = SyncState {
            server: "s".into(),
            connected: false,
            last_sync: Some(UNIX_EPOCH),
            disconnected_since: Some(UNIX_EPOCH + Duration::from_secs(30)),
            revision: Some(41),
            last_error: Some("connection refused".into()),
            refused: Some("client web-1 was removed".into()),
            ..Default::default()
        };
        let v = parse(&render(
            &state,
            &Snapshot::empty(),
            UNIX_EPOCH + Duration::from_secs(90),
        ));
        assert_eq!(v["connected"], false);
        assert_eq!(v["seconds_stale"], 60, "since the connection was lost");
        assert_eq!(v["revision"], 41);
        assert_eq!(v["disconnected_since"], "1970-01-01T00:00:30Z");
        assert_eq!(v["last_error"], "connection refused");
        assert!(v["note"]
            .as_str()
            .unwrap()
            .contains("client web-1 was removed"));
    }

    #[test]
    fn fail_closed_says_why() {
        let state = SyncState {
            last_sync: Some(UNIX_EPOCH),
            disconnected_since: Some(UNIX_EPOCH),
            max_stale: Some(Duration::from_secs(5)),
            fail_closed: true,
            ..Default::default()
        };
        let v = parse(&render(&state, &Snapshot::empty(), UNIX_EPOCH));
        assert_eq!(v["fail_closed"], true);
        assert_eq!(v["max_stale_seconds"], 5);
        assert!(v["note"].as_str().unwrap().contains("EIO"));
    }
}
