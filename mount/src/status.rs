//! The JSON shown at `.secretfs/status`: who the mount is, where it syncs
//! from, how fresh its copy is, and which names it could not show.
//!
//! It names secrets and versions, never their content.

use std::time::SystemTime;

use serde::Serialize;

use crate::snapshot::Snapshot;

/// What the sync loop knows about its connection; the snapshot supplies
/// the rest.
#[derive(Clone, Debug, Default)]
pub struct SyncState {
    /// Client name from `WhoAmI`, if the server told us.
    pub identity: Option<String>,
    pub server: String,
    pub connected: bool,
    pub last_sync: Option<SystemTime>,
    /// Why the last attempt failed, while it keeps failing.
    pub last_error: Option<String>,
    /// Set when the server refused this client; the mount is then empty.
    pub refused: Option<String>,
}

#[derive(Serialize)]
struct StatusJson<'a> {
    identity: Option<&'a str>,
    server: &'a str,
    connected: bool,
    last_sync: Option<String>,
    seconds_stale: Option<u64>,
    secrets: Vec<SecretJson<'a>>,
    skipped: Vec<SkippedJson<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<&'a str>,
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
    let note = if let Some(why) = &state.refused {
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
        connected: state.connected,
        last_sync: state
            .last_sync
            .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        seconds_stale: state
            .last_sync
            .map(|t| now.duration_since(t).map_or(0, |d| d.as_secs())),
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
        assert_eq!(v["seconds_stale"], 12);
        assert_eq!(v["secrets"][0]["name"], "db/password");
        assert_eq!(v["secrets"][0]["version"], 4);
        assert_eq!(v["skipped"][0]["name"], ".env");
        assert!(v["skipped"][0]["reason"].as_str().unwrap().contains("'.'"));
        assert!(v.get("note").is_none());
        assert!(v.get("last_error").is_none());
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
        assert_eq!(v["seconds_stale"], 90);
        assert_eq!(v["last_error"], "connection refused");
        assert!(v["note"]
            .as_str()
            .unwrap()
            .contains("client web-1 was removed"));
    }
}
