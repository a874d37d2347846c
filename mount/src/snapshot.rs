//! The set of secrets the mount shows at one moment, with the names it
//! cannot show set aside.
//!
//! Pure data: built from whatever the server returned (or a test), never
//! touched by FUSE. The tree (`tree.rs`) turns a snapshot into inodes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use crate::secret_bytes::SecretBytes;

/// Longest file name Linux accepts in one path segment.
const MAX_SEGMENT: usize = 255;

/// One version of one secret, ready to be shown as a file.
#[derive(Clone)]
pub struct SecretFile {
    pub id: u64,
    pub version: u64,
    /// Full name, `/`-separated (`db/password`).
    pub name: String,
    /// File mode bits; 0 = the mount's default.
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// When this version was created (unix seconds): the file's mtime.
    pub mtime: i64,
    /// The server's digest of the metadata sent (`SecretMeta.meta_digest`),
    /// echoed in `KnownSecret` on reconnect; 0 where none came (a static
    /// mount). Not part of the fingerprint: nothing shown depends on it.
    pub meta_digest: u64,
    pub content: Arc<SecretBytes>,
}

impl SecretFile {
    /// What must match for an unchanged secret to keep its inode and bytes.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            id: self.id,
            version: self.version,
            mode: self.mode,
            owner: self.owner,
            group: self.group,
            mtime: self.mtime,
            size: self.content.len() as u64,
        }
    }
}

/// Identity plus everything shown in a file's attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fingerprint {
    pub id: u64,
    pub version: u64,
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    pub mtime: i64,
    pub size: u64,
}

/// A name the filesystem cannot show, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// The accepted secrets (sorted by name) and the skipped names.
#[derive(Clone, Default)]
pub struct Snapshot {
    files: Vec<SecretFile>,
    skipped: Vec<Skipped>,
}

impl Snapshot {
    pub fn empty() -> Snapshot {
        Snapshot::default()
    }

    /// Screens `candidates` (see [`screen`]) and keeps the rest; nothing
    /// is shown yet.
    pub fn build(candidates: Vec<SecretFile>) -> Snapshot {
        Snapshot::build_over(candidates, |_| false)
    }

    /// As [`Snapshot::build`], replacing a snapshot that shows the names
    /// for which `shown` is true: those keep their place in a conflict.
    pub fn build_over(candidates: Vec<SecretFile>, shown: impl Fn(&str) -> bool) -> Snapshot {
        let (mut files, skipped) = screen(candidates, |f| &f.name, |f| f.id, shown);
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Snapshot { files, skipped }
    }

    pub fn files(&self) -> &[SecretFile] {
        &self.files
    }

    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&SecretFile> {
        self.files
            .binary_search_by(|f| f.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.files[i])
    }
}

/// Why a single name cannot be a path in the mount, if it cannot.
pub fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("empty name".into());
    }
    if name.contains('\0') {
        return Some("name contains a NUL byte".into());
    }
    for seg in name.split('/') {
        if seg.is_empty() {
            return Some("name has an empty segment (leading, trailing or double '/')".into());
        }
        if seg.starts_with('.') {
            return Some(format!(
                "segment {seg:?} starts with '.'; dot-names are reserved for the mount (.secretfs)"
            ));
        }
        if seg.len() > MAX_SEGMENT {
            return Some(format!(
                "segment longer than {MAX_SEGMENT} bytes, the filesystem limit"
            ));
        }
    }
    None
}

/// Splits `items` into the ones the mount can show and the skipped ones.
///
/// Conflicts (`a` is a file, `a/b` needs `a` to be a directory; or the same
/// name twice) are settled first by what is shown now (`shown` names): a
/// file a container may already use never disappears because another
/// secret was granted (one older than it, say); the newcomer is skipped.
/// Between names not shown yet, the older secret (lower id) keeps its path,
/// so the outcome does not depend on the order they arrived in.
pub fn screen<T>(
    mut items: Vec<T>,
    name_of: impl Fn(&T) -> &str,
    id_of: impl Fn(&T) -> u64,
    shown: impl Fn(&str) -> bool,
) -> (Vec<T>, Vec<Skipped>) {
    items.sort_by_cached_key(|i| (!shown(name_of(i)), id_of(i)));
    let mut files: BTreeMap<String, u64> = BTreeMap::new();
    // Directory path -> id of the first secret that needed it.
    let mut dirs: HashMap<String, u64> = HashMap::new();
    let mut kept = Vec::with_capacity(items.len());
    let mut skipped = Vec::new();
    let mut seen_skip: HashSet<String> = HashSet::new();

    for item in items {
        let name = name_of(&item).to_owned();
        let problem = name_problem(&name).or_else(|| {
            if files.contains_key(&name) {
                return Some("another secret has the same name".into());
            }
            if dirs.contains_key(&name) {
                return Some(format!(
                    "{name:?} is already a directory holding other secrets"
                ));
            }
            prefixes(&name)
                .find(|p| files.contains_key(*p))
                .map(|p| format!("{p:?} is a secret, so it cannot also be a directory"))
        });
        match problem {
            Some(reason) => {
                if seen_skip.insert(name.clone()) {
                    skipped.push(Skipped { name, reason });
                }
            }
            None => {
                let id = id_of(&item);
                for p in prefixes(&name) {
                    dirs.entry(p.to_owned()).or_insert(id);
                }
                files.insert(name, id);
                kept.push(item);
            }
        }
    }
    skipped.sort_by(|a, b| a.name.cmp(&b.name));
    (kept, skipped)
}

/// `a/b/c` -> `a`, `a/b`.
fn prefixes(name: &str) -> impl Iterator<Item = &str> {
    name.match_indices('/').map(move |(i, _)| &name[..i])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn file(id: u64, version: u64, name: &str, content: &[u8]) -> SecretFile {
        SecretFile {
            id,
            version,
            name: name.into(),
            mode: 0,
            owner: None,
            group: None,
            mtime: 1_700_000_000 + version as i64,
            meta_digest: 0,
            content: Arc::new(SecretBytes::copy_from(content)),
        }
    }

    fn names(s: &Snapshot) -> Vec<&str> {
        s.files().iter().map(|f| f.name.as_str()).collect()
    }

    #[test]
    fn dot_names_are_skipped() {
        let s = Snapshot::build(vec![
            file(1, 1, "ok", b"1"),
            file(2, 1, ".hidden", b"2"),
            file(3, 1, "db/.env", b"3"),
            file(4, 1, "a/../b", b"4"),
            file(5, 1, "a//b", b"5"),
            file(6, 1, "/abs", b"6"),
        ]);
        assert_eq!(names(&s), ["ok"]);
        let skipped: Vec<_> = s.skipped().iter().map(|k| k.name.as_str()).collect();
        assert_eq!(skipped, [".hidden", "/abs", "a/../b", "a//b", "db/.env"]);
        assert!(s.skipped()[0].reason.contains("starts with '.'"));
    }

    #[test]
    fn file_and_directory_conflict_keeps_the_older_secret() {
        // `a` (id 1) is older: `a/b` is skipped.
        let s = Snapshot::build(vec![file(2, 1, "a/b", b"x"), file(1, 1, "a", b"y")]);
        assert_eq!(names(&s), ["a"]);
        assert_eq!(s.skipped()[0].name, "a/b");
        assert!(s.skipped()[0].reason.contains("cannot also be a directory"));

        // `x/y/z` (id 1) is older: `x/y` is skipped.
        let s = Snapshot::build(vec![file(1, 1, "x/y/z", b"x"), file(2, 1, "x/y", b"y")]);
        assert_eq!(names(&s), ["x/y/z"]);
        assert_eq!(s.skipped()[0].name, "x/y");
        assert!(s.skipped()[0].reason.contains("already a directory"));
    }

    #[test]
    fn a_new_grant_never_pushes_out_a_shown_file() {
        // Review finding 9: secret `po` (older id) granted later took the
        // place of the `po/x` a container was already reading.
        let shown = |names: &'static [&'static str]| move |n: &str| names.contains(&n);
        let s = Snapshot::build_over(
            vec![file(5, 1, "po/x", b"x"), file(1, 1, "po", b"p")],
            shown(&["po/x"]),
        );
        assert_eq!(names(&s), ["po/x"]);
        assert_eq!(s.skipped()[0].name, "po");
        assert!(
            s.skipped()[0].reason.contains("already a directory"),
            "{:?}",
            s.skipped()
        );

        // The other way round: a shown file keeps its name from a newer
        // secret that needs it to be a directory.
        let s = Snapshot::build_over(
            vec![file(1, 1, "po/x", b"x"), file(5, 1, "po", b"p")],
            shown(&["po"]),
        );
        assert_eq!(names(&s), ["po"]);
        assert_eq!(s.skipped()[0].name, "po/x");

        // Between two new names the older secret wins, as before.
        let s = Snapshot::build_over(
            vec![file(5, 1, "po/x", b"x"), file(1, 1, "po", b"p")],
            shown(&["other"]),
        );
        assert_eq!(names(&s), ["po"]);
    }

    #[test]
    fn duplicates_and_lookup() {
        let s = Snapshot::build(vec![file(1, 1, "n", b"first"), file(2, 1, "n", b"second")]);
        assert_eq!(names(&s), ["n"]);
        assert_eq!(s.get("n").unwrap().content.as_bytes(), b"first");
        assert!(s.get("m").is_none());
        assert_eq!(s.skipped().len(), 1);
    }
}
