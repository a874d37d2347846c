//! Talks to the server's `Secrets` service: lists what this client may read,
//! fetches only what changed, and produces the next [`Snapshot`].
//!
//! The refresh task sends [`SyncEvent`]s; whatever produces them (polling
//! today, a server-streaming Watch later) feeds the same "apply" step.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use secretfs_proto::channel::error_chain;
use secretfs_proto::v1::secrets_client::SecretsClient;
use secretfs_proto::v1::{Empty, ReadSecretsRequest, SecretMeta};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::Code;
use zeroize::Zeroize;

use crate::secret_bytes::SecretBytes;
use crate::snapshot::{screen, Fingerprint, SecretFile, Snapshot};

/// How long one RPC may take before we call the server unreachable.
const RPC_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncError {
    /// No answer: network, TLS or server down. Keep serving; retry later.
    Unreachable(String),
    /// The server answered that this client may not read (unknown,
    /// disabled or removed). Its message is passed through.
    Refused(String),
    /// Any other error the server reported.
    Failed(String),
}

impl std::fmt::Display for SyncError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SyncError::Unreachable(r) => write!(f, "server unreachable: {r}"),
            SyncError::Refused(m) => write!(f, "server refused this client: {m}"),
            SyncError::Failed(m) => write!(f, "sync failed: {m}"),
        }
    }
}

fn classify(status: tonic::Status) -> SyncError {
    match status.code() {
        Code::Unauthenticated | Code::PermissionDenied => {
            SyncError::Refused(status.message().to_owned())
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            SyncError::Unreachable(error_chain(&status))
        }
        _ => SyncError::Failed(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// What the refresh task reports.
pub enum SyncEvent {
    Synced(Snapshot),
    Error(SyncError),
}

pub struct SecretsSource {
    client: SecretsClient<Channel>,
}

impl SecretsSource {
    pub fn new(channel: Channel) -> SecretsSource {
        SecretsSource {
            client: SecretsClient::new(channel),
        }
    }

    fn request<T>(msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.set_timeout(RPC_TIMEOUT);
        req
    }

    /// The client's name as the server sees it.
    pub async fn whoami(&mut self) -> Result<String, SyncError> {
        let resp = self
            .client
            .who_am_i(Self::request(Empty {}))
            .await
            .map_err(classify)?;
        Ok(resp.into_inner().client)
    }

    /// Lists, re-reads what differs from `current`, and returns the new
    /// snapshot. Unchanged secrets share their bytes with `current`.
    pub async fn fetch(&mut self, current: &Snapshot) -> Result<Snapshot, SyncError> {
        let listed = self
            .client
            .list_my_secrets(Self::request(Empty {}))
            .await
            .map_err(classify)?
            .into_inner()
            .secrets;
        // Screen on names before fetching content: skipped names are never read.
        let (listed, skipped) = screen(listed, |m| &m.name, |m| m.id);
        let (mut files, to_read) = reuse_unchanged(&listed, current);
        if !to_read.is_empty() {
            let wanted: HashSet<String> = to_read.iter().cloned().collect();
            // Explicit names: an empty list would mean "everything".
            let resp = self
                .client
                .read_secrets(Self::request(ReadSecretsRequest { names: to_read }))
                .await
                .map_err(classify)?
                .into_inner();
            for mut sc in resp.secrets {
                let file = sc
                    .meta
                    .as_ref()
                    .filter(|m| wanted.contains(&m.name))
                    .map(|m| file_from(m, &sc.content));
                sc.content.zeroize();
                files.extend(file);
            }
        }
        Ok(Snapshot::build_with_skipped(files, skipped))
    }
}

fn fingerprint(m: &SecretMeta) -> Fingerprint {
    Fingerprint {
        id: m.id,
        version: m.current_version,
        mode: m.mode,
        owner: m.owner,
        group: m.group,
        mtime: m.version_created_at,
        size: m.size,
    }
}

fn file_from(m: &SecretMeta, content: &[u8]) -> SecretFile {
    SecretFile {
        id: m.id,
        version: m.current_version,
        name: m.name.clone(),
        mode: m.mode,
        owner: m.owner,
        group: m.group,
        mtime: m.version_created_at,
        content: Arc::new(SecretBytes::copy_from(content)),
    }
}

/// Splits the listing into files we already hold (same id, version and
/// attributes) and names whose content must be read.
pub fn reuse_unchanged(
    listed: &[SecretMeta],
    current: &Snapshot,
) -> (Vec<SecretFile>, Vec<String>) {
    let mut keep = Vec::new();
    let mut read = Vec::new();
    for m in listed {
        match current.get(&m.name) {
            Some(f) if f.fingerprint() == fingerprint(m) => keep.push(f.clone()),
            _ => read.push(m.name.clone()),
        }
    }
    (keep, read)
}

/// Polls every `every`, starting from `current`, until the receiver goes.
pub async fn poll_loop(
    mut source: SecretsSource,
    mut current: Snapshot,
    every: Duration,
    events: mpsc::Sender<SyncEvent>,
) {
    loop {
        tokio::time::sleep(every).await;
        let event = match source.fetch(&current).await {
            Ok(snap) => {
                current = snap.clone();
                SyncEvent::Synced(snap)
            }
            Err(e) => {
                if matches!(e, SyncError::Refused(_)) {
                    // The mount drops everything; start from nothing next time.
                    current = Snapshot::empty();
                }
                SyncEvent::Error(e)
            }
        };
        if events.send(event).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::file;

    fn meta(id: u64, version: u64, name: &str, size: u64) -> SecretMeta {
        SecretMeta {
            id,
            name: name.into(),
            current_version: version,
            version_created_at: 1_700_000_000 + version as i64,
            size,
            ..Default::default()
        }
    }

    #[test]
    fn only_changed_secrets_are_read() {
        let current = Snapshot::build(vec![file(1, 1, "a", b"aa"), file(2, 1, "b", b"bb")]);
        let listed = [
            meta(1, 1, "a", 2), // unchanged
            meta(2, 2, "b", 2), // rotated
            meta(3, 1, "c", 1), // new
        ];
        let (keep, read) = reuse_unchanged(&listed, &current);
        assert_eq!(keep.len(), 1);
        assert!(Arc::ptr_eq(
            &keep[0].content,
            &current.get("a").unwrap().content
        ));
        assert_eq!(read, ["b", "c"]);

        let mut changed_mode = meta(1, 1, "a", 2);
        changed_mode.mode = 0o440;
        let (_, read) = reuse_unchanged(&[changed_mode], &current);
        assert_eq!(read, ["a"]);
    }

    #[test]
    fn status_codes_are_classified() {
        assert_eq!(
            classify(tonic::Status::permission_denied("client web-1 was removed")),
            SyncError::Refused("client web-1 was removed".into())
        );
        assert!(matches!(
            classify(tonic::Status::unauthenticated("unknown client")),
            SyncError::Refused(_)
        ));
        assert!(matches!(
            classify(tonic::Status::unavailable("down")),
            SyncError::Unreachable(_)
        ));
        assert!(matches!(
            classify(tonic::Status::internal("db")),
            SyncError::Failed(_)
        ));
    }
}
