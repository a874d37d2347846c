//! The mount's copy of the server's view, and how one `Watch` event changes
//! it.
//!
//! Pure (no gRPC, no FUSE): the stream adapter in `sync.rs` feeds events in,
//! this decides whether each one is acceptable and what the snapshot becomes.
//!
//! Rules:
//! - Every stream starts with exactly one `initial` event, which brings us
//!   from the `known` list we sent to the server's view. Only the names we
//!   sent are its base: a from-scratch request (empty `known`) replaces
//!   everything.
//! - An event is checked whole before anything changes; a bad one (see
//!   [`EventError`]) changes nothing, and the caller drops the stream and
//!   reconnects with what it holds. Nothing is applied half.
//! - Revisions never go back. Within a stream, a lower revision than one
//!   applied is out of order. An `initial` event of a from-scratch stream is
//!   accepted whatever its revision: it depends on nothing we held, and a
//!   server restored from a backup must not lock the mount out for good.
//! - Content is copied into locked memory and the event's buffers are wiped.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use secretfs_proto::v1::{KnownSecret, SecretContent, WatchEvent, WatchRequest};
use zeroize::Zeroize;

use crate::secret_bytes::SecretBytes;
use crate::snapshot::{SecretFile, Snapshot};

/// Longest name the server accepts (bytes).
const MAX_NAME: usize = 1024;
/// Longest segment of a name (bytes).
const MAX_SEGMENT: usize = 255;

/// Why an event was refused. Each one means the stream cannot be trusted
/// from here on: drop it and resync.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    #[error("event at revision {got} arrived after revision {applied} was applied (out of order)")]
    OutOfOrder { got: u64, applied: u64 },
    #[error("the stream's first event is not marked initial")]
    MissingInitial,
    #[error("a second initial event arrived on one stream")]
    RepeatedInitial,
    #[error("an upsert carries no metadata")]
    NoMeta,
    #[error("secret name {name:?} breaks the name rules: {why}")]
    BadName { name: String, why: String },
    #[error("{name:?} appears more than once in one event")]
    Duplicate { name: String },
    #[error("{name:?} is both upserted and removed in one event")]
    UpsertAndRemove { name: String },
    #[error("{name:?}: {len} bytes of content, but its metadata says {size}")]
    SizeMismatch { name: String, len: u64, size: u64 },
    #[error("{name:?} has id 0 or version 0")]
    ZeroId { name: String },
}

/// Where the current stream stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    /// No request made yet (or the last stream was dropped).
    Closed,
    /// Request sent; the initial event is due. `from_scratch`: the request
    /// listed nothing, so the initial event is the whole view.
    AwaitingInitial {
        from_scratch: bool,
    },
    Live,
}

/// Applied counts, for logs and the status page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub upserts: usize,
    pub removals: usize,
}

pub struct Mirror {
    /// Every secret the server says we may read, by name, including names
    /// the snapshot sets aside (file/directory conflicts): they are part of
    /// the server's view, so they are listed as known.
    held: BTreeMap<String, SecretFile>,
    /// Highest revision applied; 0 = none yet.
    revision: u64,
    stream: Stream,
}

impl Default for Mirror {
    fn default() -> Self {
        Mirror::new()
    }
}

impl Mirror {
    pub fn new() -> Mirror {
        Mirror {
            held: BTreeMap::new(),
            revision: 0,
            stream: Stream::Closed,
        }
    }

    /// The last revision applied (0 = none).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// The request for a new stream. `from_scratch` asks for the whole view
    /// (the periodic safety-net resync, and the first sync).
    pub fn request(&mut self, from_scratch: bool) -> WatchRequest {
        let from_scratch = from_scratch || self.held.is_empty();
        self.stream = Stream::AwaitingInitial { from_scratch };
        let known = if from_scratch {
            Vec::new()
        } else {
            self.held
                .values()
                .map(|f| KnownSecret {
                    name: f.name.clone(),
                    id: f.id,
                    version: f.version,
                })
                .collect()
        };
        WatchRequest {
            known,
            since_revision: self.revision,
        }
    }

    /// The stream is gone; the next one starts with a request.
    pub fn closed(&mut self) {
        self.stream = Stream::Closed;
    }

    /// The server disowned this client: forget everything (the bytes are
    /// wiped once the tree lets go of them too).
    pub fn clear(&mut self) {
        self.held.clear();
        self.stream = Stream::Closed;
    }

    /// Checks `event` whole, then applies it and returns the new snapshot.
    /// On error nothing changed, and the event's content is wiped anyway.
    pub fn apply(&mut self, mut event: WatchEvent) -> Result<(Snapshot, Applied), EventError> {
        let checked = self.check(&event);
        if let Err(e) = checked {
            wipe(&mut event);
            return Err(e);
        }
        let from_scratch = matches!(self.stream, Stream::AwaitingInitial { from_scratch: true });
        let mut held = if from_scratch {
            BTreeMap::new()
        } else {
            self.held.clone()
        };
        let applied = Applied {
            upserts: event.upserts.len(),
            removals: event.removals.len(),
        };
        for name in &event.removals {
            // A name we never held: the server's view and ours already agree.
            held.remove(name);
        }
        for sc in &mut event.upserts {
            let file = file_from(sc);
            held.insert(file.name.clone(), file);
        }
        wipe(&mut event);
        self.held = held;
        self.revision = self.revision.max(event.revision);
        self.stream = Stream::Live;
        Ok((self.snapshot(), applied))
    }

    /// What the mount shows: the held secrets, screened.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::build(self.held.values().cloned().collect())
    }

    fn check(&self, event: &WatchEvent) -> Result<(), EventError> {
        match (self.stream, event.initial) {
            (Stream::Live, true) => return Err(EventError::RepeatedInitial),
            (Stream::Live, false) | (Stream::AwaitingInitial { .. }, true) => {}
            // `Closed` means the caller forgot `request`; treat as a fresh
            // stream's first event, which must be initial.
            (_, false) => return Err(EventError::MissingInitial),
            (Stream::Closed, true) => {}
        }
        let from_scratch = matches!(self.stream, Stream::AwaitingInitial { from_scratch: true });
        if event.revision < self.revision && !from_scratch {
            return Err(EventError::OutOfOrder {
                got: event.revision,
                applied: self.revision,
            });
        }
        let mut upserted = HashSet::with_capacity(event.upserts.len());
        for sc in &event.upserts {
            let meta = sc.meta.as_ref().ok_or(EventError::NoMeta)?;
            check_name(&meta.name)?;
            if !upserted.insert(meta.name.as_str()) {
                return Err(EventError::Duplicate {
                    name: meta.name.clone(),
                });
            }
            if meta.id == 0 || meta.current_version == 0 {
                return Err(EventError::ZeroId {
                    name: meta.name.clone(),
                });
            }
            let len = sc.content.len() as u64;
            if len != meta.size {
                return Err(EventError::SizeMismatch {
                    name: meta.name.clone(),
                    len,
                    size: meta.size,
                });
            }
        }
        let mut removed = HashSet::with_capacity(event.removals.len());
        for name in &event.removals {
            check_name(name)?;
            if upserted.contains(name.as_str()) {
                return Err(EventError::UpsertAndRemove { name: name.clone() });
            }
            if !removed.insert(name.as_str()) {
                return Err(EventError::Duplicate { name: name.clone() });
            }
        }
        Ok(())
    }
}

/// The server's name rules (DESIGN.md): segments of `[A-Za-z0-9._-]` joined
/// by `/`, no segment empty or starting with `.`, at most 255 bytes a
/// segment and 1024 in all. The server refuses anything else, so a name
/// that breaks them did not come from a correct server.
pub fn check_name(name: &str) -> Result<(), EventError> {
    let bad = |why: String| EventError::BadName {
        name: name.chars().take(80).collect(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty".into()));
    }
    if name.len() > MAX_NAME {
        return Err(bad(format!("longer than {MAX_NAME} bytes")));
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return Err(bad("empty segment".into()));
        }
        if seg.starts_with('.') {
            return Err(bad(format!("segment {seg:?} starts with '.'")));
        }
        if seg.len() > MAX_SEGMENT {
            return Err(bad(format!("a segment is longer than {MAX_SEGMENT} bytes")));
        }
        if let Some(c) = seg
            .bytes()
            .find(|b| !(b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
        {
            return Err(bad(format!("byte {c:#04x} is not allowed")));
        }
    }
    Ok(())
}

/// Copies one checked upsert into locked memory.
fn file_from(sc: &SecretContent) -> SecretFile {
    let m = sc.meta.as_ref().expect("checked: upserts carry metadata");
    SecretFile {
        id: m.id,
        version: m.current_version,
        name: m.name.clone(),
        mode: m.mode,
        owner: m.owner,
        group: m.group,
        mtime: m.version_created_at,
        content: Arc::new(SecretBytes::copy_from(&sc.content)),
    }
}

fn wipe(event: &mut WatchEvent) {
    for sc in &mut event.upserts {
        sc.content.zeroize();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use secretfs_proto::v1::SecretMeta;

    use super::*;

    pub(crate) fn up(id: u64, version: u64, name: &str, content: &[u8]) -> SecretContent {
        SecretContent {
            meta: Some(SecretMeta {
                id,
                name: name.into(),
                current_version: version,
                version_created_at: 1_700_000_000 + version as i64,
                size: content.len() as u64,
                ..Default::default()
            }),
            content: content.to_vec(),
        }
    }

    pub(crate) fn ev(
        revision: u64,
        initial: bool,
        upserts: Vec<SecretContent>,
        removals: &[&str],
    ) -> WatchEvent {
        WatchEvent {
            revision,
            initial,
            upserts,
            removals: removals.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn content(s: &Snapshot, name: &str) -> Option<Vec<u8>> {
        s.get(name).map(|f| f.content.as_bytes().to_vec())
    }

    fn names(m: &Mirror) -> Vec<(String, u64, u64)> {
        m.held
            .values()
            .map(|f| (f.name.clone(), f.id, f.version))
            .collect()
    }

    /// A mirror holding `a` v1 and `b` v1 at revision 5, on a live stream.
    fn live() -> Mirror {
        let mut m = Mirror::new();
        let req = m.request(false);
        assert!(req.known.is_empty());
        m.apply(ev(
            5,
            true,
            vec![up(1, 1, "a", b"a1"), up(2, 1, "d/b", b"b1")],
            &[],
        ))
        .unwrap();
        m
    }

    #[test]
    fn initial_then_changes() {
        let mut m = live();
        assert_eq!(m.revision(), 5);
        let (snap, applied) = m
            .apply(ev(7, false, vec![up(1, 2, "a", b"a2")], &["d/b"]))
            .unwrap();
        assert_eq!(
            applied,
            Applied {
                upserts: 1,
                removals: 1
            }
        );
        assert_eq!(content(&snap, "a").unwrap(), b"a2");
        assert!(snap.get("d/b").is_none());
        assert_eq!(m.revision(), 7);
        // Same revision again (two events of one commit) is in order.
        m.apply(ev(7, false, vec![up(3, 1, "c", b"c")], &[]))
            .unwrap();
    }

    #[test]
    fn reconnect_lists_what_is_held_and_initial_diffs_against_it() {
        let mut m = live();
        m.closed();
        let req = m.request(false);
        assert_eq!(req.since_revision, 5);
        let mut known: Vec<_> = req.known.iter().map(|k| k.name.as_str()).collect();
        known.sort();
        assert_eq!(known, ["a", "d/b"]);
        // Nothing changed while away: an empty initial event keeps both.
        let (snap, _) = m.apply(ev(5, true, vec![], &[])).unwrap();
        assert_eq!(snap.files().len(), 2);
    }

    #[test]
    fn from_scratch_replaces_everything_and_tolerates_a_lower_revision() {
        let mut m = live();
        m.closed();
        let req = m.request(true);
        assert!(req.known.is_empty());
        let (snap, _) = m
            .apply(ev(3, true, vec![up(9, 1, "z", b"z")], &[]))
            .unwrap();
        assert_eq!(
            snap.files()
                .iter()
                .map(|f| f.name.as_str())
                .collect::<Vec<_>>(),
            ["z"]
        );
        assert_eq!(m.revision(), 5, "the highest revision seen is kept");
    }

    #[test]
    fn out_of_order_and_stream_shape_errors_change_nothing() {
        let mut m = live();
        let before = names(&m);
        m.apply(ev(6, false, vec![], &[])).unwrap();

        let cases = [
            (
                ev(5, false, vec![up(1, 9, "a", b"x")], &[]),
                EventError::OutOfOrder { got: 5, applied: 6 },
            ),
            (ev(6, true, vec![], &[]), EventError::RepeatedInitial),
        ];
        for (event, want) in cases {
            assert_eq!(m.apply(event).err(), Some(want));
            assert_eq!(names(&m), before);
        }

        m.closed();
        m.request(false);
        assert_eq!(
            m.apply(ev(7, false, vec![], &[])).err(),
            Some(EventError::MissingInitial)
        );
        // A reconnect's initial event below the applied revision: refused.
        assert!(matches!(
            m.apply(ev(2, true, vec![], &[])),
            Err(EventError::OutOfOrder { .. })
        ));
    }

    #[test]
    fn malformed_events_are_refused_whole() {
        let mut no_meta = up(3, 1, "c", b"c");
        no_meta.meta = None;
        let mut wrong_size = up(3, 1, "c", b"c");
        wrong_size.meta.as_mut().unwrap().size = 99;
        let cases: Vec<(WatchEvent, &str)> = vec![
            (
                ev(8, false, vec![up(3, 1, "c", b"c"), no_meta], &[]),
                "metadata",
            ),
            (ev(8, false, vec![up(3, 1, ".hidden", b"h")], &[]), "'.'"),
            (
                ev(8, false, vec![up(3, 1, "a//b", b"h")], &[]),
                "empty segment",
            ),
            (ev(8, false, vec![up(3, 1, "sp ace", b"h")], &[]), "0x20"),
            (ev(8, false, vec![], &["../etc"]), "'.'"),
            (
                ev(8, false, vec![up(1, 3, "a", b"a3")], &["a"]),
                "both upserted and removed",
            ),
            (
                ev(
                    8,
                    false,
                    vec![up(1, 3, "a", b"x"), up(1, 4, "a", b"y")],
                    &[],
                ),
                "more than once",
            ),
            (ev(8, false, vec![], &["a", "a"]), "more than once"),
            (ev(8, false, vec![wrong_size], &[]), "99"),
            (ev(8, false, vec![up(0, 1, "c", b"c")], &[]), "id 0"),
        ];
        for (event, needle) in cases {
            let mut m = live();
            let before = names(&m);
            m.request(false);
            m.apply(ev(5, true, vec![], &[])).unwrap();
            let Err(err) = m.apply(event) else {
                panic!("accepted a malformed event ({needle})");
            };
            assert!(err.to_string().contains(needle), "{err} lacks {needle:?}");
            assert_eq!(names(&m), before, "nothing applied after: {err}");
            assert_eq!(m.revision(), 5);
        }
    }

    #[test]
    fn name_rules() {
        for ok in ["a", "db/pass.word_1-x", &"s".repeat(255)] {
            assert_eq!(check_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "/a",
            "a/",
            "a/../b",
            ".a",
            "a\0b",
            "é",
            &"s".repeat(256),
            &["x"; 600].join("/"),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn conflicting_names_stay_known_but_are_not_shown() {
        let mut m = Mirror::new();
        m.request(false);
        let (snap, _) = m
            .apply(ev(
                1,
                true,
                vec![up(1, 1, "a", b"1"), up(2, 1, "a/b", b"2")],
                &[],
            ))
            .unwrap();
        assert_eq!(snap.files().len(), 1);
        assert_eq!(snap.skipped()[0].name, "a/b");
        assert_eq!(names(&m).len(), 2);
    }

    #[test]
    fn clear_forgets_everything() {
        let mut m = live();
        m.clear();
        assert!(m.request(false).known.is_empty());
        assert!(m.snapshot().files().is_empty());
    }
}
