//! `Secrets.Watch` on the wire: one task per stream takes the domain's
//! [`Watcher`] events and sends them, split into messages gRPC clients
//! with default limits accept.

use std::pin::Pin;
use std::task::{Context, Poll};

use secretfs_proto::codec::Wipe;
use secretfs_proto::v1;
use tokio::sync::mpsc;
use tonic::Status;

use crate::domain::{Next, Watcher, MAX_REPLY_CONTENT};

pub type Sender = mpsc::Sender<Result<v1::WatchEvent, Status>>;

/// The events a stream has queued, as tonic polls them.
pub type EventStream = Queue<v1::WatchEvent>;

/// A queue of replies whose items are wiped if they are never taken: when
/// the client goes away tonic drops the stream, and events still queued
/// (up to 16, each up to 3 MiB of content) are wiped, not just freed (the
/// codec wipes only what it encodes).
pub struct Queue<T: Wipe>(mpsc::Receiver<Result<T, Status>>);

/// A Watch stream's queue.
pub fn channel<T: Wipe>() -> (mpsc::Sender<Result<T, Status>>, Queue<T>) {
    let (tx, rx) = mpsc::channel(16);
    (tx, Queue(rx))
}

impl<T: Wipe> tokio_stream::Stream for Queue<T> {
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

impl<T: Wipe> Drop for Queue<T> {
    fn drop(&mut self) {
        self.0.close();
        while let Ok(item) = self.0.try_recv() {
            if let Ok(mut event) = item {
                event.wipe();
            }
        }
    }
}

/// Runs one Watch stream until the client goes away, loses access, or the
/// server shuts down.
pub async fn run(mut watcher: Watcher, tx: Sender) {
    loop {
        let next = tokio::select! {
            next = watcher.next() => next,
            _ = tx.closed() => return,
        };
        match next {
            Ok(Next::Event(delta)) => {
                if !send_parts(&tx, delta.into()).await {
                    return;
                }
            }
            Ok(Next::ShuttingDown) => {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "the server is shutting down; reconnect",
                    )))
                    .await;
                return;
            }
            Ok(Next::Closed) => return,
            Err(e) => {
                let _ = tx.send(Err(e.into())).await;
                return;
            }
        }
    }
}

/// Sends `event` in parts (see [`split`]); false when the client is gone.
/// Parts that can no longer be sent are wiped, not just dropped.
async fn send_parts(tx: &Sender, event: v1::WatchEvent) -> bool {
    let mut parts = split(event).into_iter();
    for part in parts.by_ref() {
        if let Err(mpsc::error::SendError(unsent)) = tx.send(Ok(part)).await {
            if let Ok(mut unsent) = unsent {
                unsent.wipe();
            }
            parts.for_each(|mut rest| rest.wipe());
            return false;
        }
    }
    true
}

/// Splits an event into messages of at most [`MAX_REPLY_CONTENT`] of
/// content each (one secret is never split), marked `continued` but the
/// last, so a client with gRPC's default 4 MiB receive limit gets any
/// change. Removals and metadata updates (no content) ride in the first
/// part; `initial` only on the first.
fn split(event: v1::WatchEvent) -> Vec<v1::WatchEvent> {
    let part = |initial, removals, meta_updates| v1::WatchEvent {
        revision: event.revision,
        initial,
        upserts: Vec::new(),
        removals,
        continued: false,
        meta_updates,
    };
    let mut parts = Vec::new();
    let mut current = part(event.initial, event.removals, event.meta_updates);
    let mut size = 0;
    for u in event.upserts {
        if !current.upserts.is_empty() && size + u.content.len() > MAX_REPLY_CONTENT {
            let next = part(false, Vec::new(), Vec::new());
            let mut full = std::mem::replace(&mut current, next);
            full.continued = true;
            parts.push(full);
            size = 0;
        }
        size += u.content.len();
        current.upserts.push(u);
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts how often it is wiped.
    struct Probe(std::sync::Arc<std::sync::atomic::AtomicUsize>);

    impl Wipe for Probe {
        fn wipe(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn events_still_queued_when_the_client_goes_away_are_wiped() {
        let wiped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (tx, mut queue) = channel::<Probe>();
        for _ in 0..3 {
            tx.send(Ok(Probe(wiped.clone()))).await.unwrap();
        }
        // One is taken (and encoded, which wipes it in the codec): the two
        // left are wiped when the stream is dropped.
        use tokio_stream::StreamExt;
        let taken = queue.next().await;
        assert_eq!(wiped.load(std::sync::atomic::Ordering::SeqCst), 0);
        drop(queue);
        assert_eq!(wiped.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert!(tx.is_closed());
        drop(taken);
    }

    fn upsert(name: &str, len: usize) -> v1::SecretContent {
        v1::SecretContent {
            meta: Some(v1::SecretMeta {
                name: name.into(),
                ..Default::default()
            }),
            content: vec![7; len],
        }
    }

    #[test]
    fn a_large_event_is_split_into_bounded_parts() {
        let mib = 1 << 20;
        let event = v1::WatchEvent {
            revision: 9,
            initial: true,
            upserts: (0..7).map(|i| upsert(&format!("s{i}"), mib)).collect(),
            removals: vec!["gone".into()],
            continued: false,
            meta_updates: Vec::new(),
        };
        let parts = split(event);
        assert_eq!(parts.len(), 3);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.revision, 9);
            assert_eq!(p.initial, i == 0);
            assert_eq!(p.continued, i + 1 < parts.len());
            let size: usize = p.upserts.iter().map(|u| u.content.len()).sum();
            assert!(size <= MAX_REPLY_CONTENT, "part {i}: {size}");
        }
        assert_eq!(parts[0].removals, ["gone"]);
        let names: Vec<_> = parts
            .iter()
            .flat_map(|p| &p.upserts)
            .map(|u| u.meta.as_ref().unwrap().name.clone())
            .collect();
        assert_eq!(names, (0..7).map(|i| format!("s{i}")).collect::<Vec<_>>());
    }

    #[test]
    fn a_small_event_is_one_message_and_a_big_secret_is_never_cut() {
        let one = split(v1::WatchEvent {
            upserts: vec![upsert("a", 10), upsert("b", 10)],
            ..Default::default()
        });
        assert_eq!(one.len(), 1);
        assert!(!one[0].continued);
        let big = split(v1::WatchEvent {
            upserts: vec![upsert("a", MAX_REPLY_CONTENT + 1)],
            ..Default::default()
        });
        assert_eq!(big.len(), 1);
        assert_eq!(big[0].upserts[0].content.len(), MAX_REPLY_CONTENT + 1);
    }
}
