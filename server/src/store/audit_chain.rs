//! The audit hash chain, backend-neutral: what each entry's MAC covers, the
//! head row's MAC, and the walk `audit verify` makes over the whole log.
//!
//! `chain_i = HMAC(audit key of epoch_i, entry_i incl. its id and epoch,
//! chain_{i-1})`, with [`GENESIS`] before the first entry. The head row
//! holds the last entry's id and chain under a MAC of its own, so a deleted
//! tail no longer reaches it. A backend feeds its entries, in id order, to a
//! [`Walker`] one at a time (a million entries never sit in memory) and
//! hands it the head at the end.

use crate::keys::{Keys, MacInput, MAC_LEN};
use crate::store::AuditEntry;

/// The "previous chain value" of the first entry.
pub const GENESIS: [u8; MAC_LEN] = [0u8; MAC_LEN];

/// What an entry's MAC covers: every column, its id and epoch, and the
/// previous entry's chain value.
pub fn entry_input(e: &AuditEntry, epoch: u32, prev: &[u8]) -> MacInput {
    MacInput::new("audit")
        .u64(e.id)
        .u64(u64::from(epoch))
        .i64(e.at_ms)
        .str(&e.actor)
        .str(&e.action)
        .opt_str(e.secret.as_deref())
        .opt_str(e.client.as_deref())
        .opt_str(e.group.as_deref())
        .opt_i64(e.version.map(|v| v as i64))
        .bool(e.allowed)
        .str(&e.detail)
        .bytes(prev)
}

/// What the head row's MAC covers.
pub fn head_input(last_id: u64, chain: &[u8], epoch: u32) -> MacInput {
    MacInput::new("audit_head")
        .u64(last_id)
        .bytes(chain)
        .u64(u64::from(epoch))
}

/// An audit entry as stored, with its chain columns (`None` where the
/// database holds NULL).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainedEntry {
    pub entry: AuditEntry,
    pub epoch: Option<u32>,
    pub chain: Option<Vec<u8>>,
    /// The previous entry's chain value (GENESIS before the first), as the
    /// sink exports it (`Store::audit_after`). Empty in the verify walk,
    /// which keeps the previous chain value itself.
    pub prev: Vec<u8>,
}

/// The head row as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditHead {
    pub last_id: u64,
    pub chain: Vec<u8>,
    pub epoch: u32,
    pub mac: Vec<u8>,
}

impl AuditHead {
    /// Signs a head under the current audit key.
    pub fn sign(keys: &Keys, last_id: u64, chain: Vec<u8>) -> AuditHead {
        let epoch = keys.current.epoch();
        let mac = keys
            .current
            .audit()
            .tag(&head_input(last_id, &chain, epoch))
            .to_vec();
        AuditHead {
            last_id,
            chain,
            epoch,
            mac,
        }
    }

    /// Whether its MAC is good under the key of its epoch.
    pub fn is_authentic(&self, keys: &Keys) -> bool {
        keys.audit_for(self.epoch).is_some_and(|k| {
            k.verify(
                &head_input(self.last_id, &self.chain, self.epoch),
                &self.mac,
            )
        })
    }
}

/// The chain value of `e` under the current audit key, after `prev`.
pub fn chain_value(keys: &Keys, e: &AuditEntry, prev: &[u8]) -> Vec<u8> {
    let epoch = keys.current.epoch();
    keys.current
        .audit()
        .tag(&entry_input(e, epoch, prev))
        .to_vec()
}

/// How the chain is broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakKind {
    /// An entry's content or chain value does not match its MAC.
    Edited,
    /// Entries are missing before this id (an id gap, or the link to the
    /// previous entry is broken).
    Deleted,
    /// An entry no key made: forged and inserted.
    Inserted,
    /// Two entries swapped places.
    Reordered,
    /// The head row records entries the log no longer has.
    TruncatedTail,
    /// The head row's MAC fails, it is missing, or it is behind the log.
    HeadEdited,
    /// Chained under a key epoch whose audit key the server does not hold.
    UnknownKey,
}

impl BreakKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakKind::Edited => "edited",
            BreakKind::Deleted => "deleted",
            BreakKind::Inserted => "inserted",
            BreakKind::Reordered => "reordered",
            BreakKind::TruncatedTail => "truncated-tail",
            BreakKind::HeadEdited => "head-edited",
            BreakKind::UnknownKey => "unknown-key",
        }
    }
}

/// The first break, at an entry id, with a sentence saying what was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainBreak {
    pub kind: BreakKind,
    pub id: u64,
    pub detail: String,
}

/// What a walk of the whole log found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditVerdict {
    /// Entries whose MAC and link were checked good.
    pub checked: u64,
    /// The last entry's id (0: none).
    pub last_id: u64,
    pub last_chain: Option<Vec<u8>>,
    /// The head row's id and chain, when there is one.
    pub head: Option<(u64, Vec<u8>)>,
    pub broken: Option<ChainBreak>,
}

#[derive(Clone)]
/// The first failing entry, kept while the walk looks further to tell an
/// edit from a move.
struct Suspect {
    row: ChainedEntry,
    /// The last good entry before it.
    good_id: u64,
    good_chain: Vec<u8>,
    /// Whether the entry after it links to its stored chain value (so that
    /// value is genuine and its content was edited). `None` until seen.
    next_links: Option<bool>,
}

/// Walks the log in id order; see the module doc.
pub struct Walker<'k> {
    keys: &'k Keys,
    verdict: AuditVerdict,
    prev_id: u64,
    prev_chain: Vec<u8>,
    suspect: Option<Suspect>,
    head: Option<AuditHead>,
    /// The head's entry id, when its MAC is good.
    authentic_head: Option<u64>,
}

impl<'k> Walker<'k> {
    /// A walk against `head` (the head row read in the same transaction).
    pub fn new(keys: &'k Keys, head: Option<AuditHead>) -> Self {
        Walker {
            authentic_head: head
                .as_ref()
                .filter(|h| h.is_authentic(keys))
                .map(|h| h.last_id),
            head,
            keys,
            verdict: AuditVerdict::default(),
            prev_id: 0,
            prev_chain: GENESIS.to_vec(),
            suspect: None,
        }
    }

    /// Whether the walk has its answer (stop feeding it).
    pub fn done(&self) -> bool {
        self.verdict.broken.is_some()
    }

    fn links(&self, e: &AuditEntry, epoch: Option<u32>, prev: &[u8], chain: &[u8]) -> bool {
        epoch
            .and_then(|ep| self.keys.audit_for(ep).map(|k| (ep, k)))
            .is_some_and(|(ep, k)| k.verify(&entry_input(e, ep, prev), chain))
    }

    fn broken(&mut self, kind: BreakKind, id: u64, detail: String) {
        self.verdict.broken = Some(ChainBreak { kind, id, detail });
    }

    /// The next entry (ids ascending). A row the backend could not decode
    /// is passed as `Err(id, why)`.
    pub fn push(&mut self, row: Result<ChainedEntry, (u64, String)>) {
        if self.done() {
            return;
        }
        let row = match row {
            Ok(row) => row,
            Err((id, why)) => {
                return self.broken(
                    BreakKind::Edited,
                    id,
                    format!("entry {id} was edited: {why}"),
                )
            }
        };
        let id = row.entry.id;
        self.verdict.last_id = id;
        self.verdict.last_chain = row.chain.clone();
        if let Some(s) = self.suspect.take() {
            let chain = row.chain.clone().unwrap_or_default();
            let next_links = s.next_links.or_else(|| {
                let stored = s.row.chain.clone().unwrap_or_default();
                Some(self.links(&row.entry, row.epoch, &stored, &chain))
            });
            let s = self.suspect.insert(Suspect { next_links, ..s }).clone();
            // Is this the entry that belongs where the suspect is?
            let moved = AuditEntry {
                id: s.row.entry.id,
                ..row.entry.clone()
            };
            let belongs = row.epoch.is_some_and(|ep| {
                self.keys.audit_for(ep).is_some_and(|k| {
                    let input = entry_input(&moved, ep, &s.good_chain);
                    k.verify(&input, &chain)
                        || s.row.chain.as_deref().is_some_and(|c| k.verify(&input, c))
                })
            });
            if belongs {
                self.suspect = None;
                let first = s.row.entry.id;
                // The suspect's content, in turn, belongs here?
                let theirs = AuditEntry {
                    id,
                    ..s.row.entry.clone()
                };
                let swapped = s.row.chain.as_deref().is_some_and(|c| {
                    self.links(&theirs, s.row.epoch, &self.prev_chain, &chain)
                        || self.links(&theirs, s.row.epoch, &self.prev_chain, c)
                });
                if swapped {
                    self.broken(
                        BreakKind::Reordered,
                        first,
                        format!("entries {first} and {id} were reordered (they swapped places)"),
                    );
                } else {
                    let n = id - first;
                    self.broken(
                        BreakKind::Inserted,
                        first,
                        format!(
                            "{n} forged entr{} inserted at id {first} (entry {first} is now at id {id})",
                            if n == 1 { "y was" } else { "ies were" }
                        ),
                    );
                }
                return;
            }
            self.prev_id = id;
            self.prev_chain = chain;
            return;
        }
        let beyond_head = self.authentic_head.is_some_and(|h| id > h);
        if beyond_head
            && !row
                .chain
                .as_deref()
                .is_some_and(|c| self.links(&row.entry, row.epoch, &self.prev_chain, c))
        {
            return self.broken(
                BreakKind::Inserted,
                id,
                format!("entry {id} was inserted after the head: no key made it"),
            );
        }
        let Some(chain) = row.chain.clone() else {
            return self.broken(
                BreakKind::Edited,
                id,
                format!(
                    "entry {id} was edited: its chain value was removed (every entry carries one)"
                ),
            );
        };
        if self.links(&row.entry, row.epoch, &self.prev_chain, &chain) {
            // The server writes contiguous ids: a gap is entries deleted,
            // even where the link holds (chained across the gap).
            if id != self.prev_id + 1 {
                let (from, to) = (self.prev_id + 1, id.saturating_sub(1));
                return self.broken(
                    BreakKind::Deleted,
                    from,
                    if from == to {
                        format!(
                            "entry {from} is missing (the ids jump from {} to {id})",
                            self.prev_id
                        )
                    } else {
                        format!(
                            "entries {from} to {to} are missing (the ids jump from {} to {id})",
                            self.prev_id
                        )
                    },
                );
            }
            self.verdict.checked += 1;
            self.prev_id = id;
            self.prev_chain = chain;
            return;
        }
        match row.epoch {
            Some(ep) if self.keys.audit_for(ep).is_none() => {
                return self.broken(
                    BreakKind::UnknownKey,
                    id,
                    format!("entry {id} was chained under key epoch {ep}, whose audit key this server does not hold"),
                )
            }
            None => {
                return self.broken(
                    BreakKind::Edited,
                    id,
                    format!("entry {id} was edited: its key epoch was removed"),
                )
            }
            Some(_) => {}
        }
        if id > self.prev_id + 1 {
            let (from, to) = (self.prev_id + 1, id - 1);
            return self.broken(
                BreakKind::Deleted,
                from,
                if from == to {
                    format!("entry {from} was deleted")
                } else {
                    format!("entries {from} to {to} were deleted")
                },
            );
        }
        self.suspect = Some(Suspect {
            good_id: self.prev_id,
            good_chain: std::mem::replace(&mut self.prev_chain, chain),
            row,
            next_links: None,
        });
        self.prev_id = id;
    }

    /// The verdict.
    pub fn finish(mut self) -> AuditVerdict {
        let head = self.head.take();
        self.verdict.head = head.as_ref().map(|h| (h.last_id, h.chain.clone()));
        if let Some(s) = self.suspect.take().filter(|_| !self.done()) {
            let id = s.row.entry.id;
            let head_has_it = head.as_ref().is_some_and(|h| {
                h.is_authentic(self.keys)
                    && h.last_id == id
                    && Some(&h.chain) == s.row.chain.as_ref()
            });
            if s.next_links == Some(true) || (s.next_links.is_none() && head_has_it) {
                self.broken(
                    BreakKind::Edited,
                    id,
                    format!("entry {id} was edited (its content no longer matches its MAC)"),
                );
            } else {
                self.broken(
                    BreakKind::Deleted,
                    id,
                    format!(
                        "the chain breaks at entry {id}: it does not follow entry {} \
                         (entries were deleted and the ids renumbered, or replaced)",
                        s.good_id
                    ),
                );
            }
        }
        if self.done() {
            return self.verdict;
        }
        let last = self.verdict.last_id;
        let Some(head) = head else {
            self.broken(
                BreakKind::HeadEdited,
                last,
                "the audit head row is missing (it was deleted)".into(),
            );
            return self.verdict;
        };
        if !head.is_authentic(self.keys) {
            let why = if self.keys.audit_for(head.epoch).is_none() {
                format!(
                    "it names key epoch {}, whose audit key this server does not hold",
                    head.epoch
                )
            } else {
                "its MAC does not match".into()
            };
            self.broken(
                BreakKind::HeadEdited,
                head.last_id,
                format!("the audit head row was edited: {why}"),
            );
        } else if head.last_id > last {
            let from = last + 1;
            self.broken(
                BreakKind::TruncatedTail,
                from,
                format!(
                    "the tail was deleted: the head records entries up to {}, the log ends at {last}",
                    head.last_id
                ),
            );
        } else if head.last_id < last {
            self.broken(
                BreakKind::HeadEdited,
                head.last_id,
                format!(
                    "the audit head row was rolled back: it records entry {} but the log holds chained entries up to {last}",
                    head.last_id
                ),
            );
        } else if self.verdict.last_chain.as_deref() != Some(&head.chain[..])
            && !(last == 0 && head.chain == GENESIS)
        {
            self.broken(
                BreakKind::HeadEdited,
                last,
                format!("the audit head row does not match entry {last}'s chain value"),
            );
        }
        self.verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::MasterKey;

    fn keys() -> Keys {
        Keys::new(MasterKey::from_hex(&"33".repeat(32)).unwrap())
    }

    /// A chain of `n` entries and its head.
    fn chain(keys: &Keys, n: u64) -> (Vec<ChainedEntry>, AuditHead) {
        let mut prev = GENESIS.to_vec();
        let mut out = Vec::new();
        for id in 1..=n {
            let entry = AuditEntry {
                id,
                at_ms: 1000 + id as i64,
                actor: format!("c{id}"),
                action: "secret.read".into(),
                secret: Some(format!("s{id}")),
                allowed: true,
                ..Default::default()
            };
            let chain = chain_value(keys, &entry, &prev);
            out.push(ChainedEntry {
                entry,
                epoch: Some(1),
                chain: Some(chain.clone()),
                prev: std::mem::replace(&mut prev, chain),
            });
        }
        let head = AuditHead::sign(keys, n, prev);
        (out, head)
    }

    fn walk(keys: &Keys, rows: Vec<ChainedEntry>, head: Option<AuditHead>) -> AuditVerdict {
        let mut w = Walker::new(keys, head);
        for r in rows {
            w.push(Ok(r));
            if w.done() {
                break;
            }
        }
        w.finish()
    }

    fn kind(v: &AuditVerdict) -> (BreakKind, u64) {
        let b = v.broken.as_ref().expect("a break");
        (b.kind, b.id)
    }

    /// An id gap is a deletion even when the chain links across it.
    #[test]
    fn an_id_gap_is_reported_even_where_the_link_holds() {
        let k = keys();
        let (mut rows, _) = chain(&k, 4);
        // Re-chain with entry 3 numbered 5 (ids 1, 2, 5, 6).
        let mut prev = GENESIS.to_vec();
        for (i, r) in rows.iter_mut().enumerate() {
            if i >= 2 {
                r.entry.id += 2;
            }
            let c = chain_value(&k, &r.entry, &prev);
            r.chain = Some(c.clone());
            r.prev = std::mem::replace(&mut prev, c);
        }
        let head = AuditHead::sign(&k, 6, prev);
        let v = walk(&k, rows, Some(head));
        assert_eq!(kind(&v), (BreakKind::Deleted, 3));
        assert!(v
            .broken
            .unwrap()
            .detail
            .contains("entries 3 to 4 are missing"));
    }

    #[test]
    fn a_whole_chain_verifies() {
        let k = keys();
        let (rows, head) = chain(&k, 6);
        let v = walk(&k, rows, Some(head));
        assert_eq!(v.broken, None);
        assert_eq!((v.checked, v.last_id), (6, 6));
        let (_, empty) = chain(&k, 0);
        assert_eq!(walk(&k, vec![], Some(empty)).broken, None);
    }

    #[test]
    fn every_kind_of_break_is_found_where_it_is() {
        let k = keys();
        let (rows, head) = chain(&k, 8);
        // Edited field.
        let mut r = rows.clone();
        r[3].entry.detail = "x".into();
        assert_eq!(
            kind(&walk(&k, r, Some(head.clone()))),
            (BreakKind::Edited, 4)
        );
        // Edited last entry.
        let mut r = rows.clone();
        r[7].entry.allowed = false;
        assert_eq!(
            kind(&walk(&k, r, Some(head.clone()))),
            (BreakKind::Edited, 8)
        );
        // Chain removed.
        let mut r = rows.clone();
        r[2].chain = None;
        assert_eq!(
            kind(&walk(&k, r, Some(head.clone()))),
            (BreakKind::Edited, 3)
        );
        // Deleted (id gap).
        let mut r = rows.clone();
        r.remove(4);
        assert_eq!(
            kind(&walk(&k, r, Some(head.clone()))),
            (BreakKind::Deleted, 5)
        );
        // Deleted and renumbered.
        let mut r = rows.clone();
        r.remove(4);
        for (i, e) in r.iter_mut().enumerate() {
            e.entry.id = i as u64 + 1;
        }
        assert_eq!(kind(&walk(&k, r, Some(head.clone()))).0, BreakKind::Deleted);
        // Reordered: contents swapped, chains kept; and whole rows swapped.
        for with_chain in [false, true] {
            let mut r = rows.clone();
            let (a, b) = (r[2].clone(), r[5].clone());
            r[2].entry = AuditEntry { id: 3, ..b.entry };
            r[5].entry = AuditEntry { id: 6, ..a.entry };
            if with_chain {
                r[2].chain = b.chain;
                r[5].chain = a.chain;
            }
            let v = walk(&k, r, Some(head.clone()));
            assert_eq!(
                kind(&v),
                (BreakKind::Reordered, 3),
                "with_chain {with_chain}: {v:?}"
            );
        }
        // Inserted in the middle (ids shifted up) and after the head.
        let mut r = rows.clone();
        let mut forged = r[4].clone();
        forged.entry.actor = "mallory".into();
        r.insert(4, forged);
        for (i, e) in r.iter_mut().enumerate() {
            e.entry.id = i as u64 + 1;
        }
        assert_eq!(
            kind(&walk(&k, r, Some(head.clone()))),
            (BreakKind::Inserted, 5)
        );
        let mut r = rows.clone();
        let mut forged = r[7].clone();
        forged.entry.id = 9;
        forged.chain = Some(vec![7; 32]);
        r.push(forged);
        assert_eq!(
            kind(&walk(&k, r, Some(head.clone()))),
            (BreakKind::Inserted, 9)
        );
        // Truncated tail.
        let mut r = rows.clone();
        r.truncate(5);
        assert_eq!(
            kind(&walk(&k, r, Some(head.clone()))),
            (BreakKind::TruncatedTail, 6)
        );
        // Head edited, missing, rolled back.
        let mut h = head.clone();
        h.last_id = 5;
        assert_eq!(
            kind(&walk(&k, rows.clone(), Some(h))).0,
            BreakKind::HeadEdited
        );
        assert_eq!(kind(&walk(&k, rows.clone(), None)).0, BreakKind::HeadEdited);
        let (_, old_head) = chain(&k, 5);
        assert_eq!(
            kind(&walk(&k, rows.clone(), Some(old_head))),
            (BreakKind::HeadEdited, 5)
        );
        // An epoch whose key is not held.
        let mut r = rows.clone();
        r[1].epoch = Some(7);
        assert_eq!(kind(&walk(&k, r, Some(head))), (BreakKind::UnknownKey, 2));
    }
}
