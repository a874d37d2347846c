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

/// Splits an event into messages of at most [`MAX_REPLY_CONTENT`]
/// encoded bytes of removals, metadata updates and secrets each (one item
/// is never split, so a message holding a single secret of the largest
/// size is that secret and its metadata), marked `continued` but the last,
/// so a client with gRPC's default 4 MiB receive limit gets any change,
/// however many metadata updates it holds (an old mount reconnecting gets
/// one for every secret). Items keep their order: removals, then metadata
/// updates, then secrets; `initial` only on the first part.
fn split(event: v1::WatchEvent) -> Vec<v1::WatchEvent> {
    use prost::Message;
    let part = |initial| v1::WatchEvent {
        revision: event.revision,
        initial,
        ..Default::default()
    };
    let mut parts = Vec::new();
    let mut current = part(event.initial);
    let mut size = 0;
    // Starts a new part when `len` more bytes would not fit beside what
    // the current one holds.
    let mut room_for = |len: usize, current: &mut v1::WatchEvent| {
        let empty = current.removals.is_empty()
            && current.meta_updates.is_empty()
            && current.upserts.is_empty();
        if !empty && size + len > MAX_REPLY_CONTENT {
            let mut full = std::mem::replace(current, part(false));
            full.continued = true;
            parts.push(full);
            size = 0;
        }
        size += len;
    };
    // Each item's size as a repeated field: its bytes, a tag and a length.
    let framed = |len: usize| len + 1 + prost::length_delimiter_len(len);
    for r in event.removals {
        room_for(framed(r.len()), &mut current);
        current.removals.push(r);
    }
    for m in event.meta_updates {
        room_for(framed(m.encoded_len()), &mut current);
        current.meta_updates.push(m);
    }
    for u in event.upserts {
        room_for(framed(u.encoded_len()), &mut current);
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

    /// Checks the parts of `event`: order kept, `initial` and `continued`
    /// right, each message within the bound; returns them.
    fn checked_split(event: v1::WatchEvent) -> Vec<v1::WatchEvent> {
        use prost::Message;
        let whole = event.clone();
        let parts = split(event);
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.revision, whole.revision);
            assert_eq!(p.initial, whole.initial && i == 0);
            assert_eq!(p.continued, i + 1 < parts.len());
            let len = p.encoded_len();
            assert!(len <= MAX_REPLY_CONTENT + 64, "part {i}: {len} bytes");
        }
        let all = |f: &dyn Fn(&v1::WatchEvent) -> Vec<String>| -> Vec<String> {
            parts.iter().flat_map(f).collect()
        };
        assert_eq!(all(&|p| p.removals.clone()), whole.removals);
        let metas = |v: &[v1::SecretMeta]| v.iter().map(|m| m.name.clone()).collect::<Vec<_>>();
        assert_eq!(all(&|p| metas(&p.meta_updates)), metas(&whole.meta_updates));
        let ups = |v: &[v1::SecretContent]| {
            v.iter()
                .map(|u| u.meta.as_ref().unwrap().name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(all(&|p| ups(&p.upserts)), ups(&whole.upserts));
        parts
    }

    #[test]
    fn a_large_event_is_split_into_bounded_parts() {
        let mib = 1 << 20;
        let parts = checked_split(v1::WatchEvent {
            revision: 9,
            initial: true,
            upserts: (0..7).map(|i| upsert(&format!("s{i}"), mib)).collect(),
            removals: vec!["gone".into()],
            continued: false,
            meta_updates: Vec::new(),
        });
        assert!(parts.len() >= 3, "{}", parts.len());
        assert_eq!(parts[0].removals, ["gone"]);
    }

    #[test]
    fn metadata_updates_count_toward_the_bound_and_are_spread_over_parts() {
        // An old mount reconnecting: a metadata update for every secret
        // (each up to ~21 KB), beside content near the bound.
        let meta = |i: usize| v1::SecretMeta {
            name: format!("m{i}"),
            description: "d".repeat(20_000),
            ..Default::default()
        };
        let parts = checked_split(v1::WatchEvent {
            revision: 3,
            upserts: vec![upsert("big", MAX_REPLY_CONTENT - 1000), upsert("small", 10)],
            meta_updates: (0..400).map(meta).collect(),
            removals: (0..1000).map(|i| format!("gone/{i}")).collect(),
            ..Default::default()
        });
        assert!(parts.len() >= 4, "{}", parts.len());
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
