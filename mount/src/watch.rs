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
//! - A change may come in parts (`continued`): each part is checked on its
//!   own and its content copied into locked memory at once, then the parts
//!   are applied together when the last one arrives. The parts must carry
//!   the change's revision, only the first may be `initial`, and all of them
//!   together stay under [`MAX_CHANGE`]. A stream that ends (or errs)
//!   between parts applies none of them.
//! - Content is copied into locked memory and the event's buffers are wiped.
//! - A metadata update (`meta_updates`) changes the attributes of a secret
//!   we hold at exactly its id and version; it carries no content, and one
//!   for anything else is refused. Each held secret's metadata digest is
//!   sent back in `known`, so the server knows which metadata we hold.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use secretfs_proto::v1::{KnownSecret, SecretContent, SecretMeta, WatchEvent, WatchRequest};
use zeroize::Zeroize;

use crate::secret_bytes::SecretBytes;
use crate::snapshot::{SecretFile, Snapshot};

/// Longest name the server accepts (bytes).
const MAX_NAME: usize = 1024;
/// Longest segment of a name (bytes).
const MAX_SEGMENT: usize = 255;
/// Most content and name bytes one change may carry, all its parts
/// together: the whole view of a client at its first sync.
pub const MAX_CHANGE: usize = 256 * 1024 * 1024;

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
    #[error("a part of the change at revision {first} came with revision {got}")]
    PartRevision { first: u64, got: u64 },
    #[error("a continuing part of a change is marked initial (only the first part may be)")]
    InitialPart,
    #[error("one change carries more than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("a metadata update for {name:?} does not match the id and version held")]
    MetaUpdateNotHeld { name: String },
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
    /// The parts of a change received so far (`continued`).
    pending: Option<Change>,
    /// [`MAX_CHANGE`]; smaller in tests.
    max_change: usize,
    /// The names the last snapshot showed: they keep their place when a
    /// newcomer conflicts with them (only names: no content kept alive).
    shown: HashSet<String>,
}

/// One change, possibly gathered from several messages; its content is in
/// locked memory already.
struct Change {
    revision: u64,
    initial: bool,
    upserts: Vec<SecretFile>,
    removals: Vec<String>,
    /// Metadata without content, for secrets held at that version.
    meta_updates: Vec<SecretMeta>,
    /// Content and name bytes so far, against [`MAX_CHANGE`].
    size: usize,
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
            pending: None,
            max_change: MAX_CHANGE,
            shown: HashSet::new(),
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
        self.pending = None;
        let known = if from_scratch {
            Vec::new()
        } else {
            self.held
                .values()
                .map(|f| KnownSecret {
                    name: f.name.clone(),
                    id: f.id,
                    version: f.version,
                    meta_digest: f.meta_digest,
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
        // A change cut off between its parts: none of it (wiped on drop).
        self.pending = None;
    }

    /// The server disowned this client: forget everything (the bytes are
    /// wiped once the tree lets go of them too).
    pub fn clear(&mut self) {
        self.held.clear();
        self.shown.clear();
        self.stream = Stream::Closed;
        self.pending = None;
    }

    /// Takes one message of the stream. A part of a change (`continued`)
    /// is checked, copied into locked memory and held: `Ok(None)`. With the
    /// last part the whole change is checked, then applied, and the new
    /// snapshot returned. On error nothing changed, the parts held are
    /// dropped, and the message's content is wiped anyway.
    pub fn receive(
        &mut self,
        mut msg: WatchEvent,
    ) -> Result<Option<(Snapshot, Applied)>, EventError> {
        let gathered = self.gather(&mut msg);
        wipe(&mut msg);
        let change = match gathered {
            Ok(Some(change)) => change,
            Ok(None) => return Ok(None),
            Err(e) => {
                self.pending = None;
                return Err(e);
            }
        };
        self.check(&change)?;
        Ok(Some(self.commit(change)))
    }

    /// A whole (not `continued`) event, for tests.
    #[cfg(test)]
    pub fn apply(&mut self, event: WatchEvent) -> Result<(Snapshot, Applied), EventError> {
        assert!(!event.continued, "apply takes whole events");
        self.receive(event)
            .map(|applied| applied.expect("a whole event is applied"))
    }

    /// Adds `msg` to the change being gathered; the change once complete.
    fn gather(&mut self, msg: &mut WatchEvent) -> Result<Option<Change>, EventError> {
        let mut change = match self.pending.take() {
            None => Change {
                revision: msg.revision,
                initial: msg.initial,
                upserts: Vec::new(),
                removals: Vec::new(),
                meta_updates: Vec::new(),
                size: 0,
            },
            Some(change) if msg.revision != change.revision => {
                return Err(EventError::PartRevision {
                    first: change.revision,
                    got: msg.revision,
                })
            }
            Some(_) if msg.initial => return Err(EventError::InitialPart),
            Some(change) => change,
        };
        for sc in &msg.upserts {
            check_upsert(sc)?;
        }
        for name in &msg.removals {
            check_name(name)?;
        }
        for meta in &msg.meta_updates {
            check_meta(meta)?;
        }
        // Counted before anything is copied.
        change.size = msg
            .upserts
            .iter()
            .map(|sc| sc.content.len() + sc.meta.as_ref().map_or(0, |m| m.name.len()))
            .chain(msg.removals.iter().map(String::len))
            .chain(msg.meta_updates.iter().map(|m| m.name.len()))
            .fold(change.size, usize::saturating_add);
        if change.size > self.max_change {
            return Err(EventError::TooLarge {
                limit: self.max_change,
            });
        }
        change.upserts.extend(msg.upserts.iter_mut().map(file_from));
        change.removals.append(&mut msg.removals);
        change.meta_updates.append(&mut msg.meta_updates);
        if msg.continued {
            self.pending = Some(change);
            return Ok(None);
        }
        Ok(Some(change))
    }

    /// Applies a checked change.
    fn commit(&mut self, change: Change) -> (Snapshot, Applied) {
        let from_scratch = matches!(self.stream, Stream::AwaitingInitial { from_scratch: true });
        let mut held = if from_scratch {
            BTreeMap::new()
        } else {
            self.held.clone()
        };
        let applied = Applied {
            upserts: change.upserts.len() + change.meta_updates.len(),
            removals: change.removals.len(),
        };
        for name in &change.removals {
            // A name we never held: the server's view and ours already agree.
            held.remove(name);
        }
        for file in change.upserts {
            held.insert(file.name.clone(), file);
        }
        for meta in &change.meta_updates {
            // Checked: held at this id and version. Same bytes, new
            // attributes: the tree gives the name a new inode (attributes
            // are part of an inode's fingerprint) and invalidates the entry.
            if let Some(file) = held.get_mut(&meta.name) {
                file.mode = meta.mode;
                file.owner = meta.owner;
                file.group = meta.group;
                file.meta_digest = meta.meta_digest;
            }
        }
        self.held = held;
        self.revision = self.revision.max(change.revision);
        self.stream = Stream::Live;
        let snap = self.snapshot();
        // What the mount shows from now on.
        self.shown = snap.files().iter().map(|f| f.name.clone()).collect();
        (snap, applied)
    }

    /// The held secrets as the mount would show them: screened against
    /// what it showed so far.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::build_over(self.held.values().cloned().collect(), |name| {
            self.shown.contains(name)
        })
    }

    /// The checks that need the whole change and the stream's state.
    fn check(&self, change: &Change) -> Result<(), EventError> {
        match (self.stream, change.initial) {
            (Stream::Live, true) => return Err(EventError::RepeatedInitial),
            (Stream::Live, false) | (Stream::AwaitingInitial { .. }, true) => {}
            // `Closed` means the caller forgot `request`; treat as a fresh
            // stream's first event, which must be initial.
            (_, false) => return Err(EventError::MissingInitial),
            (Stream::Closed, true) => {}
        }
        let from_scratch = matches!(self.stream, Stream::AwaitingInitial { from_scratch: true });
        if change.revision < self.revision && !from_scratch {
            return Err(EventError::OutOfOrder {
                got: change.revision,
                applied: self.revision,
            });
        }
        let mut upserted = HashSet::with_capacity(change.upserts.len());
        for f in &change.upserts {
            if !upserted.insert(f.name.as_str()) {
                return Err(EventError::Duplicate {
                    name: f.name.clone(),
                });
            }
        }
        let mut removed = HashSet::with_capacity(change.removals.len());
        for name in &change.removals {
            if upserted.contains(name.as_str()) {
                return Err(EventError::UpsertAndRemove { name: name.clone() });
            }
            if !removed.insert(name.as_str()) {
                return Err(EventError::Duplicate { name: name.clone() });
            }
        }
        let mut updated = HashSet::with_capacity(change.meta_updates.len());
        for m in &change.meta_updates {
            let name = m.name.as_str();
            if upserted.contains(name) || removed.contains(name) || !updated.insert(name) {
                return Err(EventError::Duplicate {
                    name: m.name.clone(),
                });
            }
            // From scratch, nothing held counts: a metadata update there
            // has nothing to apply to.
            let held = self
                .held
                .get(name)
                .filter(|_| !from_scratch)
                .is_some_and(|f| f.id == m.id && f.version == m.current_version);
            if !held {
                return Err(EventError::MetaUpdateNotHeld {
                    name: m.name.clone(),
                });
            }
        }
        Ok(())
    }
}

/// The checks one upsert passes on its own.
fn check_upsert(sc: &SecretContent) -> Result<(), EventError> {
    let meta = sc.meta.as_ref().ok_or(EventError::NoMeta)?;
    check_name(&meta.name)?;
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
    Ok(())
}

/// The checks one metadata update passes on its own.
fn check_meta(meta: &SecretMeta) -> Result<(), EventError> {
    check_name(&meta.name)?;
    if meta.id == 0 || meta.current_version == 0 {
        return Err(EventError::ZeroId {
            name: meta.name.clone(),
        });
    }
    Ok(())
}

/// The server's name rules (server/src/names.rs): segments of `[A-Za-z0-9._-]` joined
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

/// Moves one checked upsert's content into locked memory: the decoded
/// buffer is wiped right after the copy.
fn file_from(sc: &mut SecretContent) -> SecretFile {
    let m = sc.meta.as_ref().expect("checked: upserts carry metadata");
    SecretFile {
        id: m.id,
        version: m.current_version,
        name: m.name.clone(),
        mode: m.mode,
        owner: m.owner,
        group: m.group,
        mtime: m.version_created_at,
        meta_digest: m.meta_digest,
        content: {
            let locked = Arc::new(SecretBytes::copy_from(&sc.content));
            sc.content.zeroize();
            locked
        },
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
            continued: false,
            meta_updates: Vec::new(),
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

    /// The metadata of `name` held at `id`/`version`, with a new mode and
    /// owner.
    fn meta(id: u64, version: u64, name: &str, mode: u32, owner: u32) -> SecretMeta {
        SecretMeta {
            id,
            name: name.into(),
            current_version: version,
            mode,
            owner: Some(owner),
            meta_digest: 77,
            ..Default::default()
        }
    }

    #[test]
    fn a_metadata_update_changes_attributes_and_keeps_the_bytes() {
        let mut m = live();
        let bytes_before = m.held["a"].content.clone();
        let event = WatchEvent {
            meta_updates: vec![meta(1, 1, "a", 0o440, 1234)],
            ..ev(6, false, vec![], &[])
        };
        let (snap, applied) = m.apply(event).unwrap();
        assert_eq!(applied.upserts, 1);
        let a = snap.get("a").unwrap();
        assert_eq!((a.mode, a.owner, a.version), (0o440, Some(1234), 1));
        assert!(Arc::ptr_eq(&a.content, &bytes_before), "no new content");
        assert_eq!(content(&snap, "a").unwrap(), b"a1");
        // The digest goes back to the server with what is held.
        m.closed();
        let req = m.request(false);
        let known: std::collections::HashMap<_, _> = req
            .known
            .iter()
            .map(|k| (k.name.as_str(), k.meta_digest))
            .collect();
        assert_eq!(known["a"], 77);
        assert_eq!(known["d/b"], 0, "the test server sent no digest for it");
    }

    #[test]
    fn a_metadata_update_for_what_is_not_held_is_refused_whole() {
        for bad in [
            meta(1, 2, "a", 0o440, 1), // another version
            meta(9, 1, "a", 0o440, 1), // another id
            meta(3, 1, "c", 0o440, 1), // not held
        ] {
            let mut m = live();
            let event = WatchEvent {
                meta_updates: vec![bad],
                ..ev(6, false, vec![up(3, 1, "e", b"e")], &[])
            };
            assert!(matches!(
                m.apply(event),
                Err(EventError::MetaUpdateNotHeld { .. })
            ));
            assert_eq!(m.revision(), 5, "nothing applied");
            assert_eq!(m.snapshot().files().len(), 2);
        }
        // Named twice in one event (as an upsert too) is a duplicate.
        let mut m = live();
        let event = WatchEvent {
            meta_updates: vec![meta(1, 1, "a", 0o440, 1)],
            ..ev(6, false, vec![up(1, 2, "a", b"a2")], &[])
        };
        assert!(matches!(m.apply(event), Err(EventError::Duplicate { .. })));
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
    fn content_is_wiped_from_the_message_as_it_is_copied() {
        let mut sc = up(1, 1, "a", b"hunter2");
        let f = file_from(&mut sc);
        assert_eq!(f.content.as_bytes(), b"hunter2");
        assert!(sc.content.is_empty(), "the decoded copy is left behind");
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

    fn part(
        revision: u64,
        initial: bool,
        upserts: Vec<SecretContent>,
        removals: &[&str],
    ) -> WatchEvent {
        WatchEvent {
            continued: true,
            ..ev(revision, initial, upserts, removals)
        }
    }

    #[test]
    fn a_split_initial_event_is_applied_whole() {
        let mut m = Mirror::new();
        m.request(true);
        let parts = [
            part(9, true, vec![up(1, 1, "a", b"a1")], &[]),
            part(9, false, vec![up(2, 1, "d/b", b"b1")], &[]),
            part(9, false, vec![], &[]),
        ];
        for p in parts {
            assert!(m.receive(p).unwrap().is_none(), "a part applies nothing");
            assert!(m.snapshot().files().is_empty());
            assert_eq!(m.revision(), 0);
        }
        let (snap, applied) = m
            .receive(ev(9, false, vec![up(3, 1, "c", b"c1")], &[]))
            .unwrap()
            .expect("the last part applies the change");
        assert_eq!(applied.upserts, 3);
        assert_eq!(content(&snap, "a").unwrap(), b"a1");
        assert_eq!(content(&snap, "d/b").unwrap(), b"b1");
        assert_eq!(content(&snap, "c").unwrap(), b"c1");
        assert_eq!(m.revision(), 9);
        // Live now: a later split change applies the same way.
        assert!(m
            .receive(part(10, false, vec![], &["a"]))
            .unwrap()
            .is_none());
        let (snap, _) = m
            .receive(ev(10, false, vec![up(1, 2, "a2", b"x")], &[]))
            .unwrap()
            .unwrap();
        assert!(snap.get("a").is_none() && snap.get("a2").is_some());
    }

    #[test]
    fn parts_of_one_change_must_agree() {
        // A revision that changes between parts.
        let mut m = live();
        let before = names(&m);
        assert!(m
            .receive(part(6, false, vec![up(1, 9, "a", b"x")], &[]))
            .unwrap()
            .is_none());
        assert_eq!(
            m.receive(ev(7, false, vec![], &[])).err(),
            Some(EventError::PartRevision { first: 6, got: 7 })
        );
        assert_eq!((names(&m), m.revision()), (before.clone(), 5));

        // `initial` on a part after the first.
        let mut m = Mirror::new();
        m.request(true);
        m.receive(part(3, true, vec![], &[])).unwrap();
        assert_eq!(
            m.receive(ev(3, true, vec![], &[])).err(),
            Some(EventError::InitialPart)
        );
        assert!(m.snapshot().files().is_empty());

        // Checks spanning parts: the same name in two of them.
        let mut m = live();
        m.receive(part(6, false, vec![up(3, 1, "c", b"1")], &[]))
            .unwrap();
        assert_eq!(
            m.receive(ev(6, false, vec![], &["c"])).err(),
            Some(EventError::UpsertAndRemove { name: "c".into() })
        );
        assert_eq!(names(&m), before);

        // All parts together stay under the limit.
        let mut m = live();
        m.max_change = 10;
        m.receive(part(6, false, vec![up(3, 1, "c", b"12345")], &[]))
            .unwrap();
        assert_eq!(
            m.receive(ev(6, false, vec![up(4, 1, "e", b"12345")], &[]))
                .err(),
            Some(EventError::TooLarge { limit: 10 })
        );
        assert_eq!(names(&m), before);
    }

    #[test]
    fn a_stream_ending_between_parts_applies_nothing() {
        let mut m = live();
        let before = names(&m);
        assert!(m
            .receive(part(6, false, vec![up(1, 2, "a", b"a2")], &["d/b"]))
            .unwrap()
            .is_none());
        m.closed();
        assert_eq!(names(&m), before);
        assert_eq!(m.revision(), 5);
        // The next stream starts clean: its initial event is not taken for
        // the rest of the cut-off change.
        let req = m.request(false);
        assert_eq!(req.since_revision, 5);
        let (snap, _) = m.receive(ev(5, true, vec![], &[])).unwrap().unwrap();
        assert_eq!(content(&snap, "a").unwrap(), b"a1");
        assert!(snap.get("d/b").is_some());
    }

    #[test]
    fn a_shown_file_keeps_its_place_when_a_conflicting_secret_is_granted() {
        let mut m = Mirror::new();
        m.request(true);
        m.apply(ev(1, true, vec![up(5, 1, "po/x", b"x")], &[]))
            .unwrap();
        // Secret 1 (older) is granted now as `po`: it waits, po/x stays.
        let (snap, _) = m
            .apply(ev(2, false, vec![up(1, 1, "po", b"p")], &[]))
            .unwrap();
        assert_eq!(content(&snap, "po/x").unwrap(), b"x");
        assert_eq!(snap.skipped()[0].name, "po");
        // Still so at the next change and at a from-scratch resync.
        let (snap, _) = m
            .apply(ev(3, false, vec![up(6, 1, "q", b"q")], &[]))
            .unwrap();
        assert!(snap.get("po/x").is_some() && snap.get("po").is_none());
        m.closed();
        m.request(true);
        let (snap, _) = m
            .apply(ev(
                3,
                true,
                vec![up(1, 1, "po", b"p"), up(5, 1, "po/x", b"x")],
                &[],
            ))
            .unwrap();
        assert!(snap.get("po/x").is_some() && snap.get("po").is_none());
        // Once po/x is gone, po takes its place.
        let (snap, _) = m.apply(ev(4, false, vec![], &["po/x"])).unwrap();
        assert_eq!(content(&snap, "po").unwrap(), b"p");
    }

    #[test]
    fn clear_forgets_everything() {
        let mut m = live();
        m.clear();
        assert!(m.request(false).known.is_empty());
        assert!(m.snapshot().files().is_empty());
    }
}

#[cfg(test)]
mod prop_tests;
