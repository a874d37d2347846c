//! Group commit for audit entries.
//!
//! Every secret read is audited before its content leaves the server. One
//! durable SQLite commit per read would cap reads (and Watch fan-out) at a
//! few thousand a second; instead, one writer thread takes everything that
//! queued while it was committing and writes it in one transaction. Each
//! caller still waits for its own entries to be durable before it answers.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::store::{AuditEntry, Store, StoreError};

type Job = (Vec<AuditEntry>, oneshot::Sender<Result<(), String>>);

#[derive(Clone)]
pub struct AuditLog {
    jobs: mpsc::UnboundedSender<Job>,
}

impl AuditLog {
    /// Starts the writer thread; it ends (dropping its store handle) when
    /// every `AuditLog` is dropped.
    pub fn start(store: Arc<dyn Store>) -> (AuditLog, std::thread::JoinHandle<()>) {
        let (jobs, mut rx) = mpsc::unbounded_channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let (mut entries, first_ack) = first;
                    let mut acks = vec![first_ack];
                    while let Ok((more, ack)) = rx.try_recv() {
                        entries.extend(more);
                        acks.push(ack);
                    }
                    let result = store.append_audit(&entries).map_err(|e| e.to_string());
                    if let Err(e) = &result {
                        tracing::error!(error = %e, entries = entries.len(), "writing the audit log failed");
                    }
                    for ack in acks {
                        let _ = ack.send(result.clone());
                    }
                }
            })
            .expect("spawn the audit writer thread");
        (AuditLog { jobs }, thread)
    }

    /// Returns once `entries` are committed.
    pub async fn append(&self, entries: Vec<AuditEntry>) -> Result<(), Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let (ack, done) = oneshot::channel();
        self.jobs
            .send((entries, ack))
            .map_err(|_| Error::Stopped("the audit writer has stopped"))?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Store(StoreError::CommitFailed(format!(
                "audit log: {e}"
            )))),
            Err(_) => Err(Error::Stopped("the audit writer has stopped")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{AuditFilter, SqliteStore};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_all_land_and_each_waits_for_its_own() {
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
        let (log, _thread) = AuditLog::start(store.clone());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                log.append(vec![AuditEntry {
                    actor: format!("c{i}"),
                    action: "secret.read".into(),
                    allowed: true,
                    ..Default::default()
                }])
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let all = store
            .query_audit(&AuditFilter {
                limit: 1000,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(all.len(), 200);
    }
}
