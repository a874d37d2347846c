//! Property tests of `Watch` event validation: the server's events are
//! input the mount must not trust blindly. Arbitrary sequences of
//! arbitrary events (bad names, zero ids, wrong sizes, duplicates, parts,
//! stray initial flags, revisions going back, metadata updates for what is
//! not held) never panic; a refused event changes nothing; an accepted one
//! changes what is held exactly as a simple reference model says; and no
//! held or shown name is one the mount forbids (`..`, `.secretfs`, empty
//! segments, over-long names).

use std::collections::BTreeMap;

use proptest::prelude::*;
use secretfs_proto::v1::{SecretContent, SecretMeta, WatchEvent};

use super::*;
use crate::prop_support::config;

/// What the model holds of one secret.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Held {
    id: u64,
    version: u64,
    mode: u32,
    owner: Option<u32>,
    group: Option<u32>,
    digest: u64,
    content: Vec<u8>,
}

fn held_of(f: &SecretFile) -> Held {
    Held {
        id: f.id,
        version: f.version,
        mode: f.mode,
        owner: f.owner,
        group: f.group,
        digest: f.meta_digest,
        content: f.content.as_bytes().to_vec(),
    }
}

fn mirror_held(m: &Mirror) -> BTreeMap<String, Held> {
    m.held
        .iter()
        .map(|(n, f)| (n.clone(), held_of(f)))
        .collect()
}

/// The server's name rule, as the README ("Secrets") gives it.
fn name_model(name: &str) -> bool {
    (1..=1024).contains(&name.len())
        && name.split('/').all(|s| {
            (1..=255).contains(&s.len())
                && !s.starts_with('.')
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
}

/// What the mount must never show, whatever the server says.
fn forbidden(name: &str) -> bool {
    name.is_empty()
        || name.len() > 1024
        || name.split('/').any(|s| {
            s.is_empty()
                || s == "."
                || s == ".."
                || s == ".secretfs"
                || s.len() > 255
                || s.contains('\0')
        })
}

/// Names: a few good ones that conflict (`a` beside `a/b`), and the ones
/// the mount must refuse.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        40 => prop::sample::select(vec!["a", "b", "a/b", "c/d/e", "c", "x-1.y_z"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec![
            "", "..", ".", ".secretfs", ".secretfs/status", "a/../b", "a//b", "/a", "a/", "a/.x",
            "a b", "a\0b", "é", "a\\b", "a\nb",
        ])
        .prop_map(str::to_owned),
        1 => (250usize..260).prop_map(|n| "s".repeat(n)),
        1 => (1020usize..1030).prop_map(|n| {
            let mut s = "a/".repeat(n / 2);
            s.truncate(n);
            s
        }),
        1 => any::<String>(),
    ]
}

prop_compose! {
    fn meta()(
        name in name(), id in prop_oneof![20 => 1u64..3, 1 => Just(0)],
        version in prop_oneof![20 => 1u64..3, 1 => Just(0)], mode in any::<u32>(),
        owner in any::<Option<u32>>(), group in any::<Option<u32>>(), meta_digest in 0u64..3,
    ) -> SecretMeta {
        SecretMeta { name, id, current_version: version, mode, owner, group, meta_digest, ..Default::default() }
    }
}

prop_compose! {
    fn upsert()(
        meta in prop::option::weighted(0.95, meta()),
        content in prop::collection::vec(any::<u8>(), 0..8),
        size_off in prop_oneof![20 => Just(0i64), 1 => -2i64..3],
    ) -> SecretContent {
        let meta = meta.map(|mut m| {
            m.size = (content.len() as i64 + size_off).max(0) as u64;
            m
        });
        SecretContent { meta, content }
    }
}

prop_compose! {
    fn event()(
        revision in 0u64..8,
        initial in prop::bool::weighted(0.3),
        upserts in prop::collection::vec(upsert(), 0..4),
        removals in prop::collection::vec(name(), 0..3),
        continued in prop::bool::weighted(0.2),
        meta_updates in prop::collection::vec(meta(), 0..2),
    ) -> WatchEvent {
        WatchEvent { revision, initial, upserts, removals, continued, meta_updates }
    }
}

/// How an event is fitted to the stream when it is sent, so that most
/// events are well formed in all but what the test varies: `initial` set
/// right, the revision at or after the last one (a part: its change's),
/// metadata updates naming what is held.
#[derive(Debug, Clone)]
struct Fit {
    initial: bool,
    revision: Option<u64>,
    meta_held: Vec<prop::sample::Index>,
}

fn fit() -> impl Strategy<Value = Fit> {
    (
        prop::bool::weighted(0.9),
        prop::option::weighted(0.9, 0u64..3),
        prop::collection::vec(any::<prop::sample::Index>(), 0..2),
    )
        .prop_map(|(initial, revision, meta_held)| Fit {
            initial,
            revision,
            meta_held,
        })
}

#[derive(Debug, Clone)]
enum Step {
    Event(WatchEvent, Fit),
    /// The stream is dropped; a new request, from scratch or not.
    Reconnect(bool),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => (event(), fit()).prop_map(|(e, f)| Step::Event(e, f)),
        1 => any::<bool>().prop_map(Step::Reconnect),
    ]
}

/// Applies a change that was accepted to the model.
fn apply_model(model: &mut BTreeMap<String, Held>, from_scratch: bool, parts: &[WatchEvent]) {
    if from_scratch {
        model.clear();
    }
    for p in parts {
        for name in &p.removals {
            model.remove(name);
        }
    }
    for p in parts {
        for sc in &p.upserts {
            let m = sc.meta.as_ref().unwrap();
            model.insert(
                m.name.clone(),
                Held {
                    id: m.id,
                    version: m.current_version,
                    mode: m.mode,
                    owner: m.owner,
                    group: m.group,
                    digest: m.meta_digest,
                    content: sc.content.clone(),
                },
            );
        }
    }
    for p in parts {
        for m in &p.meta_updates {
            let h = model.get_mut(&m.name).unwrap();
            h.mode = m.mode;
            h.owner = m.owner;
            h.group = m.group;
            h.digest = m.meta_digest;
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_names_follow_the_servers_rule(name in name()) {
        prop_assert_eq!(check_name(&name).is_ok(), name_model(&name), "{:?}", name);
        if check_name(&name).is_ok() {
            prop_assert!(!forbidden(&name));
        }
    }

    #[test]
    fn prop_events_are_refused_whole_or_applied_as_the_model_says(
        small in any::<bool>(),
        first_from_scratch in any::<bool>(),
        steps in prop::collection::vec(step(), 1..12),
    ) {
        let mut m = Mirror::new();
        if small {
            m.max_change = 40;
        }
        let mut model: BTreeMap<String, Held> = BTreeMap::new();
        m.request(first_from_scratch);
        // `request` asks from scratch when nothing is held.
        let mut from_scratch = true;
        let mut awaiting_initial = true;
        let mut parts: Vec<WatchEvent> = Vec::new();
        for step in steps {
            let ev = match step {
                Step::Reconnect(fresh) => {
                    m.closed();
                    let req = m.request(fresh);
                    from_scratch = fresh || model.is_empty();
                    awaiting_initial = true;
                    parts.clear();
                    // What we hold is what we say we hold.
                    let known: BTreeMap<String, (u64, u64, u64)> = req
                        .known
                        .iter()
                        .map(|k| (k.name.clone(), (k.id, k.version, k.meta_digest)))
                        .collect();
                    let want: BTreeMap<String, (u64, u64, u64)> = if from_scratch {
                        BTreeMap::new()
                    } else {
                        model.iter().map(|(n, h)| (n.clone(), (h.id, h.version, h.digest))).collect()
                    };
                    prop_assert_eq!(known, want);
                    continue;
                }
                Step::Event(mut ev, fit) => {
                    if fit.initial {
                        ev.initial = awaiting_initial && parts.is_empty();
                    }
                    if let Some(ahead) = fit.revision {
                        ev.revision = parts.first().map_or(m.revision() + ahead, |p| p.revision);
                    }
                    for (mu, at) in ev.meta_updates.iter_mut().zip(&fit.meta_held) {
                        if !model.is_empty() {
                            let (name, h) = model.iter().nth(at.index(model.len())).unwrap();
                            mu.name = name.clone();
                            mu.id = h.id;
                            mu.current_version = h.version;
                        }
                    }
                    ev
                }
            };
            let before = (mirror_held(&m), m.revision());
            match m.receive(ev.clone()) {
                Err(_) => {
                    // Nothing changed; the caller drops the stream.
                    prop_assert_eq!(&(mirror_held(&m), m.revision()), &before);
                    prop_assert!(m.pending.is_none());
                    m.closed();
                    m.request(false);
                    from_scratch = model.is_empty();
                    awaiting_initial = true;
                    parts.clear();
                }
                Ok(None) => {
                    prop_assert!(ev.continued);
                    prop_assert_eq!(&(mirror_held(&m), m.revision()), &before);
                    parts.push(ev);
                }
                Ok(Some((snap, _applied))) => {
                    prop_assert!(!ev.continued);
                    parts.push(ev);
                    apply_model(&mut model, from_scratch, &parts);
                    prop_assert_eq!(&mirror_held(&m), &model);
                    if !from_scratch {
                        prop_assert!(m.revision() >= before.1, "revision went back");
                    }
                    from_scratch = false;
                    awaiting_initial = false;
                    parts.clear();
                    for name in m.held.keys() {
                        prop_assert!(name_model(name) && !forbidden(name), "held {:?}", name);
                    }
                    for f in snap.files() {
                        prop_assert!(!forbidden(&f.name), "shown {:?}", f.name);
                        prop_assert_eq!(Some(&held_of(f)), model.get(&f.name));
                        // No file is also a directory of another.
                        let dir = format!("{}/", f.name);
                        prop_assert!(!snap.files().iter().any(|g| g.name.starts_with(&dir)));
                    }
                }
            }
        }
    }
}
