//! The filesystem as inodes: answers lookup, getattr, read and readdir for
//! the FUSE adapter, and works out what the kernel must forget when a new
//! snapshot replaces the old one.
//!
//! Pure (no FUSE, no I/O), so every rule here is unit-tested without a mount.
//!
//! Inode rules:
//! - Each version of a secret is its own immutable inode: the key is the
//!   name plus the [`Fingerprint`] (id, version and the shown attributes).
//!   A rotation points the name at a new inode; the old inode keeps its bytes
//!   for as long as the kernel holds a reference (open files, cached dentries),
//!   which it tells us through lookup counts (`lookup`, readdirplus) and
//!   `forget`. A node that is neither current nor referenced is dropped at
//!   once, which wipes its bytes (`SecretBytes` zeroizes on drop).
//! - A secret that leaves the view (deleted, access revoked, client
//!   removed) is different from a rotation: its old inodes lose their bytes
//!   at once and answer reads with `Revoked` (EIO), and the kernel is told
//!   to drop their cached pages, so a descriptor opened before cannot go on
//!   reading it. A rotated secret's old inode keeps its version instead (a
//!   file handle keeps the version it opened).
//! - Directories keep their inode while their path exists. A path that
//!   vanishes and comes back gets a fresh inode, because the kernel marked
//!   the old one dead when we told it the name was deleted.
//! - Inode numbers are never reused, so the generation is always 0.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::secret_bytes::SecretBytes;
use crate::snapshot::{Fingerprint, Snapshot};

/// The tree, shared by the FUSE threads and the sync loop.
pub type SharedTree = Arc<Mutex<Tree>>;

/// Locks the shared tree.
pub fn lock(tree: &SharedTree) -> MutexGuard<'_, Tree> {
    // A panic inside a FUSE callback must not take the whole mount down
    // with poisoned-lock panics; the tree's invariants hold between calls.
    tree.lock().unwrap_or_else(|p| p.into_inner())
}

pub const ROOT_INO: u64 = 1;
/// The hidden `.secretfs` folder.
pub const CONTROL_INO: u64 = 2;
/// `.secretfs/status`.
pub const STATUS_INO: u64 = 3;
const FIRST_DYNAMIC_INO: u64 = 4;

pub const CONTROL_DIR: &str = ".secretfs";
pub const STATUS_FILE: &str = "status";

/// Directory mode: traversable and listable by the container's user, whoever
/// it is; nothing can be written anyway.
pub const DIR_MODE: u16 = 0o555;
/// The status file names secrets (not their content): readable by the
/// mount's default owner and group only.
pub const STATUS_MODE: u16 = 0o440;

/// What a filesystem call can fail with; turned into an errno in one place
/// (`fuse.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    /// The kernel asked about an inode we no longer have.
    #[error("stale inode")]
    Stale,
    /// The mount has been cut off from the server for longer than
    /// `--max-stale`: secrets fail closed.
    #[error("secrets unavailable: cut off from the server for too long")]
    Unavailable,
    /// An inode of a secret that has left the view, still open somewhere.
    #[error("secret no longer readable: deleted or access revoked")]
    Revoked,
}

/// Owner, group and mode for secrets that do not set their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Defaults {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    /// What every secret file gets whatever its secret says.
    pub force: Force,
}

/// `--force-uid`, `--force-gid`, `--force-mode`: for images that run as a
/// fixed uid, whatever owner or mode the secrets were given. Directories
/// and the status file keep `--uid`/`--gid`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Force {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mode: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: SystemTime,
}

/// A message for the kernel after a change, sent by the caller once it has
/// released the lock around the tree (the kernel may need a FUSE callback to
/// finish before it can apply one, and callbacks need that lock).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Invalidation {
    /// `parent/name` now points elsewhere (or newly exists): drop the dentry.
    Entry { parent: u64, name: String },
    /// `parent/name` (inode `child`) is gone.
    Delete {
        parent: u64,
        child: u64,
        name: String,
    },
    /// The inode's attributes (and for files, cached pages) changed.
    Inode { ino: u64 },
}

/// One entry of a directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    /// Cookie for the next readdir call (1-based position).
    pub offset: u64,
    pub name: String,
    pub attr: Attr,
}

/// The bytes a read returns, kept alive without holding the tree's lock.
pub struct ReadOut {
    data: Data,
    start: usize,
    end: usize,
}

enum Data {
    Secret(Arc<SecretBytes>),
    Plain(Arc<[u8]>),
}

impl ReadOut {
    pub fn bytes(&self) -> &[u8] {
        let all = match &self.data {
            Data::Secret(s) => s.as_bytes(),
            Data::Plain(p) => p,
        };
        &all[self.start..self.end]
    }
}

enum Body {
    Dir {
        children: BTreeMap<String, u64>,
    },
    Secret {
        /// The secret's id: what survives a rotation.
        id: u64,
        content: Arc<SecretBytes>,
    },
    /// A secret inode whose secret left the view; its bytes are gone.
    Revoked,
    Status,
}

struct Node {
    attr: Attr,
    parent: u64,
    body: Body,
    /// Lookups the kernel has not yet forgotten.
    nlookup: u64,
    /// Reachable from the root in the current snapshot.
    current: bool,
}

pub struct Tree {
    defaults: Defaults,
    nodes: HashMap<u64, Node>,
    /// Current secret files by name and fingerprint.
    files: HashMap<(String, Fingerprint), u64>,
    /// Current directories by path ("" is the root).
    dirs: HashMap<String, u64>,
    next_ino: u64,
    status: Arc<[u8]>,
    /// Cut off too long: every secret answers `Unavailable` (EIO).
    fail_closed: bool,
}

/// What a path in the new layout should hold.
enum Want {
    Dir(String),
    File(usize),
}

impl Tree {
    /// An empty tree (only the root and `.secretfs/status`).
    pub fn new(defaults: Defaults, now: SystemTime) -> Tree {
        let dir_attr = |ino| Attr {
            ino,
            kind: Kind::Dir,
            size: 0,
            perm: DIR_MODE,
            uid: defaults.uid,
            gid: defaults.gid,
            nlink: 2,
            mtime: now,
        };
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT_INO,
            Node {
                attr: Attr {
                    nlink: 3,
                    ..dir_attr(ROOT_INO)
                },
                parent: ROOT_INO,
                body: Body::Dir {
                    children: BTreeMap::from([(CONTROL_DIR.to_owned(), CONTROL_INO)]),
                },
                nlookup: 0,
                current: true,
            },
        );
        nodes.insert(
            CONTROL_INO,
            Node {
                attr: dir_attr(CONTROL_INO),
                parent: ROOT_INO,
                body: Body::Dir {
                    children: BTreeMap::from([(STATUS_FILE.to_owned(), STATUS_INO)]),
                },
                nlookup: 0,
                current: true,
            },
        );
        nodes.insert(
            STATUS_INO,
            Node {
                attr: Attr {
                    ino: STATUS_INO,
                    kind: Kind::File,
                    size: 0,
                    perm: STATUS_MODE,
                    uid: defaults.uid,
                    gid: defaults.gid,
                    nlink: 1,
                    mtime: now,
                },
                parent: CONTROL_INO,
                body: Body::Status,
                nlookup: 0,
                current: true,
            },
        );
        Tree {
            defaults,
            nodes,
            files: HashMap::new(),
            dirs: HashMap::from([(String::new(), ROOT_INO)]),
            next_ino: FIRST_DYNAMIC_INO,
            status: Arc::from(&b""[..]),
            fail_closed: false,
        }
    }

    /// Looks `name` up in `parent`; the kernel now holds one more reference.
    pub fn lookup(&mut self, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        let children = self.children(parent)?;
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let ino = *children.get(name).ok_or(FsError::NotFound)?;
        self.check_open(ino)?;
        let node = self.nodes.get_mut(&ino).ok_or(FsError::Stale)?;
        node.nlookup += 1;
        Ok(node.attr)
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.nlookup = node.nlookup.saturating_sub(n);
            if node.nlookup == 0 && !node.current {
                self.nodes.remove(&ino);
            }
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        self.check_open(ino)?;
        self.nodes.get(&ino).map(|n| n.attr).ok_or(FsError::Stale)
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<ReadOut, FsError> {
        self.check_open(ino)?;
        let node = self.nodes.get(&ino).ok_or(FsError::Stale)?;
        let data = match &node.body {
            Body::Dir { .. } => return Err(FsError::IsDir),
            Body::Secret { content, .. } => Data::Secret(content.clone()),
            Body::Revoked => return Err(FsError::Revoked),
            Body::Status => Data::Plain(self.status.clone()),
        };
        let len = match &data {
            Data::Secret(s) => s.len(),
            Data::Plain(p) => p.len(),
        };
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
        let end = start.saturating_add(size as usize).min(len);
        Ok(ReadOut { data, start, end })
    }

    /// Lists `ino` from after cookie `offset`, feeding entries to `add` until
    /// it returns `true` (reply buffer full). With `plus`, each accepted
    /// entry other than `.`/`..` counts as a lookup, as the kernel counts it
    /// (readdirplus links every entry it receives).
    pub fn readdir(
        &mut self,
        ino: u64,
        offset: u64,
        plus: bool,
        mut add: impl FnMut(&DirEntry) -> bool,
    ) -> Result<(), FsError> {
        self.check_open(ino)?;
        let node = self.nodes.get(&ino).ok_or(FsError::Stale)?;
        let Body::Dir { children } = &node.body else {
            return Err(FsError::NotDir);
        };
        let parent_attr = self.nodes.get(&node.parent).map_or(node.attr, |p| p.attr);
        let mut entries = vec![(".".to_owned(), node.attr), ("..".to_owned(), parent_attr)];
        for (name, child) in children {
            if self.check_open(*child).is_err() {
                continue;
            }
            if let Some(c) = self.nodes.get(child) {
                entries.push((name.clone(), c.attr));
            }
        }
        let mut accepted = Vec::new();
        for (i, (name, attr)) in entries.into_iter().enumerate().skip(offset as usize) {
            let entry = DirEntry {
                offset: i as u64 + 1,
                name,
                attr,
            };
            if add(&entry) {
                break;
            }
            if i >= 2 {
                accepted.push(entry.attr.ino);
            }
        }
        if plus {
            for ino in accepted {
                if let Some(n) = self.nodes.get_mut(&ino) {
                    n.nlookup += 1;
                }
            }
        }
        Ok(())
    }

    /// Turns failing closed on or off, and returns what the kernel must
    /// forget so that nothing is served from its caches meanwhile: every
    /// name (cached dentries would skip our lookup) and every inode,
    /// including old versions kept by open files (cached pages would skip
    /// our read).
    pub fn set_fail_closed(&mut self, on: bool) -> Vec<Invalidation> {
        if self.fail_closed == on {
            return Vec::new();
        }
        self.fail_closed = on;
        let mut inval = Vec::new();
        let mut dirs: Vec<u64> = self.dirs.values().copied().collect();
        dirs.sort_unstable();
        for &dir in &dirs {
            let Ok(children) = self.children(dir) else {
                continue;
            };
            for name in children.keys() {
                if !(dir == ROOT_INO && name == CONTROL_DIR) {
                    inval.push(Invalidation::Entry {
                        parent: dir,
                        name: name.clone(),
                    });
                }
            }
        }
        let mut inodes: Vec<u64> = self
            .nodes
            .keys()
            .copied()
            .filter(|&i| i >= FIRST_DYNAMIC_INO)
            .collect();
        inodes.sort_unstable();
        inodes.push(ROOT_INO); // its listing changes
        inval.extend(inodes.into_iter().map(|ino| Invalidation::Inode { ino }));
        inval
    }

    /// Whether `ino` may be served now: the root and `.secretfs` always are
    /// (the status says why the rest is not).
    fn check_open(&self, ino: u64) -> Result<(), FsError> {
        if self.fail_closed && ino >= FIRST_DYNAMIC_INO {
            Err(FsError::Unavailable)
        } else {
            Ok(())
        }
    }

    /// Replaces the status file's content.
    pub fn set_status(&mut self, content: Vec<u8>, now: SystemTime) -> Invalidation {
        if let Some(node) = self.nodes.get_mut(&STATUS_INO) {
            node.attr.size = content.len() as u64;
            node.attr.mtime = now;
        }
        self.status = Arc::from(content);
        Invalidation::Inode { ino: STATUS_INO }
    }

    /// Makes `snap` the current content and returns what the kernel must
    /// forget. Unchanged secrets keep their inodes (and cached pages).
    pub fn apply(&mut self, snap: &Snapshot, now: SystemTime) -> Vec<Invalidation> {
        let layout = layout(snap);

        // Inodes for the new layout: reuse what is unchanged.
        let mut new_dirs: HashMap<String, u64> = HashMap::new();
        for path in layout.keys() {
            let ino = match self.dirs.get(path) {
                Some(&ino) => ino,
                None => self.alloc(),
            };
            new_dirs.insert(path.clone(), ino);
        }
        let mut new_files: HashMap<(String, Fingerprint), u64> = HashMap::new();
        let mut file_ino: Vec<u64> = Vec::with_capacity(snap.files().len());
        for f in snap.files() {
            let key = (f.name.clone(), f.fingerprint());
            let ino = match self.files.get(&key) {
                Some(&ino) => ino,
                None => self.alloc(),
            };
            file_ino.push(ino);
            new_files.insert(key, ino);
        }
        let mut new_children: HashMap<u64, BTreeMap<String, u64>> = HashMap::new();
        for (path, entries) in &layout {
            let children = entries
                .iter()
                .map(|(name, want)| {
                    let ino = match want {
                        Want::Dir(p) => new_dirs[p],
                        Want::File(i) => file_ino[*i],
                    };
                    (name.clone(), ino)
                })
                .collect();
            new_children.insert(new_dirs[path], children);
        }
        new_children
            .get_mut(&ROOT_INO)
            .expect("root is always in the layout")
            .insert(CONTROL_DIR.to_owned(), CONTROL_INO);

        // What the kernel must hear, computed against the old tree.
        let mut inval = Vec::new();
        let mut dir_changed = Vec::new();
        let mut old_dirs: Vec<(&String, &u64)> = self.dirs.iter().collect();
        old_dirs.sort();
        for (_, &dir) in old_dirs {
            let Some(new) = new_children.get(&dir) else {
                continue; // removed: its parent reports it
            };
            let old = self.children(dir).expect("current dirs are dirs");
            if old == new {
                continue;
            }
            dir_changed.push(dir);
            for (name, &child) in old {
                match new.get(name) {
                    Some(&n) if n == child => {}
                    // A new version (or a directory now). Not `Delete`: on
                    // Linux 6.18 it raises no inotify event either (see
                    // docs/mount-live.md), and it would mark the old inode
                    // unlinked under the open files still reading it.
                    Some(_) if !self.is_dir(child) => inval.push(Invalidation::Entry {
                        parent: dir,
                        name: name.clone(),
                    }),
                    _ => self.deleted_subtree(dir, name, child, &mut inval),
                }
            }
            for name in new.keys().filter(|n| !old.contains_key(*n)) {
                // Clears a negative dentry, should the kernel have one.
                inval.push(Invalidation::Entry {
                    parent: dir,
                    name: name.clone(),
                });
            }
        }
        inval.extend(dir_changed.iter().map(|&ino| Invalidation::Inode { ino }));

        // Retire nodes that left the tree; drop the ones nobody references.
        let mut keep: HashSet<u64> = new_dirs.values().copied().collect();
        keep.extend(file_ino.iter().copied());
        let retired: Vec<u64> = self
            .dirs
            .values()
            .chain(self.files.values())
            .copied()
            .filter(|ino| !keep.contains(ino))
            .collect();
        for ino in retired {
            let drop_now = match self.nodes.get_mut(&ino) {
                Some(node) => {
                    node.current = false;
                    if let Body::Dir { children } = &mut node.body {
                        children.clear();
                    }
                    node.nlookup == 0
                }
                None => false,
            };
            if drop_now {
                self.nodes.remove(&ino);
            }
        }
        // Every inode of a secret that left (its last version and older ones
        // that open files still hold): wipe the bytes now, not when the
        // kernel forgets them, and make the kernel drop its cached copy.
        let shown_ids: HashSet<u64> = snap.files().iter().map(|f| f.id).collect();
        let mut revoked = Vec::new();
        for (&ino, node) in self.nodes.iter_mut() {
            if let Body::Secret { id, .. } = node.body {
                if !node.current && !shown_ids.contains(&id) {
                    node.body = Body::Revoked;
                    // As a deleted file shows to an open handle's fstat.
                    node.attr.nlink = 0;
                    revoked.push(ino);
                }
            }
        }
        revoked.sort_unstable();
        inval.extend(revoked.into_iter().map(|ino| Invalidation::Inode { ino }));

        // Install the new layout.
        for (i, f) in snap.files().iter().enumerate() {
            let ino = file_ino[i];
            if self.nodes.contains_key(&ino) {
                continue;
            }
            let force = self.defaults.force;
            let perm = force.mode.unwrap_or(if f.mode != 0 {
                f.mode
            } else {
                self.defaults.mode
            });
            let attr = Attr {
                ino,
                kind: Kind::File,
                size: f.content.len() as u64,
                perm: (perm & 0o777) as u16,
                uid: force.uid.or(f.owner).unwrap_or(self.defaults.uid),
                gid: force.gid.or(f.group).unwrap_or(self.defaults.gid),
                nlink: 1,
                mtime: unix_time(f.mtime),
            };
            self.nodes.insert(
                ino,
                Node {
                    attr,
                    parent: ROOT_INO, // fixed up below
                    body: Body::Secret {
                        id: f.id,
                        content: f.content.clone(),
                    },
                    nlookup: 0,
                    current: true,
                },
            );
        }
        let changed: HashSet<u64> = dir_changed.into_iter().collect();
        let dir_inos: HashSet<u64> = new_dirs.values().copied().collect();
        let defaults = self.defaults;
        for (path, &ino) in &new_dirs {
            let children = new_children.remove(&ino).unwrap_or_default();
            let subdirs = children
                .values()
                .filter(|c| dir_inos.contains(c) || **c == CONTROL_INO)
                .count() as u32;
            let parent = parent_path(path).map_or(ROOT_INO, |p| new_dirs[p]);
            for &child in children.values() {
                if let Some(c) = self.nodes.get_mut(&child) {
                    if child != CONTROL_INO {
                        c.parent = ino;
                    }
                }
            }
            let node = self.nodes.entry(ino).or_insert_with(|| Node {
                attr: Attr {
                    ino,
                    kind: Kind::Dir,
                    size: 0,
                    perm: DIR_MODE,
                    uid: defaults.uid,
                    gid: defaults.gid,
                    nlink: 2,
                    mtime: now,
                },
                parent,
                body: Body::Dir {
                    children: BTreeMap::new(),
                },
                nlookup: 0,
                current: true,
            });
            if changed.contains(&ino) {
                node.attr.mtime = now;
            }
            node.attr.nlink = 2 + subdirs;
            node.body = Body::Dir { children };
        }
        self.dirs = new_dirs;
        self.files = new_files;
        inval
    }

    /// Drops every secret, referenced or not (shutdown, or the server
    /// disowned this client and the kernel must not keep any bytes either).
    pub fn wipe(&mut self, now: SystemTime) -> Vec<Invalidation> {
        // `apply` has already revoked every secret inode the kernel holds:
        // no `Body::Secret` is left.
        let inval = self.apply(&Snapshot::empty(), now);
        self.nodes.retain(|_, n| n.current || n.nlookup > 0);
        inval
    }

    /// Number of inodes held (current or still referenced), for tests and
    /// the status page.
    pub fn inode_count(&self) -> usize {
        self.nodes.len()
    }

    fn alloc(&mut self) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        ino
    }

    fn children(&self, ino: u64) -> Result<&BTreeMap<String, u64>, FsError> {
        match &self.nodes.get(&ino).ok_or(FsError::Stale)?.body {
            Body::Dir { children } => Ok(children),
            _ => Err(FsError::NotDir),
        }
    }

    fn is_dir(&self, ino: u64) -> bool {
        matches!(
            self.nodes.get(&ino).map(|n| &n.body),
            Some(Body::Dir { .. })
        )
    }

    /// Deletes `parent/name` and, for a directory, everything below it,
    /// children first: the kernel refuses to delete a directory dentry that
    /// still has cached children.
    fn deleted_subtree(&self, parent: u64, name: &str, child: u64, out: &mut Vec<Invalidation>) {
        if let Ok(children) = self.children(child) {
            for (n, &c) in children {
                self.deleted_subtree(child, n, c, out);
            }
        }
        out.push(Invalidation::Delete {
            parent,
            child,
            name: name.to_owned(),
        });
    }
}

/// Directory path -> (entry name -> what it holds), root at "".
fn layout(snap: &Snapshot) -> BTreeMap<String, BTreeMap<String, Want>> {
    let mut dirs: BTreeMap<String, BTreeMap<String, Want>> = BTreeMap::new();
    dirs.insert(String::new(), BTreeMap::new());
    for (i, f) in snap.files().iter().enumerate() {
        let mut parent = String::new();
        let mut segs = f.name.split('/').peekable();
        while let Some(seg) = segs.next() {
            let entries = dirs.entry(parent.clone()).or_default();
            if segs.peek().is_none() {
                // Snapshot screening rules out conflicts; never overwrite.
                entries.entry(seg.to_owned()).or_insert(Want::File(i));
                break;
            }
            let path = if parent.is_empty() {
                seg.to_owned()
            } else {
                format!("{parent}/{seg}")
            };
            entries
                .entry(seg.to_owned())
                .or_insert_with(|| Want::Dir(path.clone()));
            parent = path;
        }
    }
    dirs
}

fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    Some(path.rfind('/').map_or("", |i| &path[..i]))
}

fn unix_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::tests::file;
    use crate::snapshot::SecretFile;

    const DEFAULTS: Defaults = Defaults {
        uid: 1000,
        gid: 2000,
        mode: 0o400,
        force: Force {
            uid: None,
            gid: None,
            mode: None,
        },
    };

    fn tree(files: Vec<SecretFile>) -> Tree {
        let mut t = Tree::new(DEFAULTS, UNIX_EPOCH);
        t.apply(&Snapshot::build(files), UNIX_EPOCH);
        t
    }

    fn look(t: &mut Tree, path: &str) -> Result<Attr, FsError> {
        let mut ino = ROOT_INO;
        let mut attr = t.getattr(ROOT_INO)?;
        for seg in path.split('/') {
            attr = t.lookup(ino, OsStr::new(seg))?;
            ino = attr.ino;
        }
        Ok(attr)
    }

    fn read_all(t: &Tree, ino: u64) -> Vec<u8> {
        t.read(ino, 0, u32::MAX).unwrap().bytes().to_vec()
    }

    fn list(t: &mut Tree, ino: u64) -> Vec<String> {
        let mut names = Vec::new();
        t.readdir(ino, 0, false, |e| {
            names.push(e.name.clone());
            false
        })
        .unwrap();
        names
    }

    #[test]
    fn lookup_attributes_and_nested_dirs() {
        let mut f = file(7, 3, "db/password", b"s3cret");
        f.mode = 0o640;
        f.owner = Some(33);
        let mut t = tree(vec![f, file(8, 1, "token", b"abc")]);

        let db = look(&mut t, "db").unwrap();
        assert_eq!(db.kind, Kind::Dir);
        assert_eq!(db.perm, 0o555);
        assert_eq!((db.uid, db.gid), (1000, 2000));

        let pw = look(&mut t, "db/password").unwrap();
        assert_eq!(pw.kind, Kind::File);
        assert_eq!(pw.perm, 0o640);
        assert_eq!((pw.uid, pw.gid), (33, 2000));
        assert_eq!(pw.size, 6);
        assert_eq!(pw.mtime, UNIX_EPOCH + Duration::from_secs(1_700_000_003));

        let tok = look(&mut t, "token").unwrap();
        assert_eq!(tok.perm, 0o400, "default mode");
        assert_eq!((tok.uid, tok.gid), (1000, 2000));

        assert_eq!(look(&mut t, "nope"), Err(FsError::NotFound));
        assert_eq!(look(&mut t, "token/x"), Err(FsError::NotDir));
        assert_eq!(t.getattr(ROOT_INO).unwrap().nlink, 4); // ., db, .secretfs
    }

    #[test]
    fn forced_owner_and_mode_win_over_the_secrets() {
        let mut f = file(7, 3, "db/password", b"s3cret");
        f.mode = 0o640;
        f.owner = Some(33);
        f.group = Some(44);
        let defaults = Defaults {
            force: Force {
                uid: Some(5000),
                gid: None,
                mode: Some(0o444),
            },
            ..DEFAULTS
        };
        let mut t = Tree::new(defaults, UNIX_EPOCH);
        t.apply(
            &Snapshot::build(vec![f, file(8, 1, "token", b"abc")]),
            UNIX_EPOCH,
        );
        let pw = look(&mut t, "db/password").unwrap();
        assert_eq!((pw.perm, pw.uid, pw.gid), (0o444, 5000, 44));
        let tok = look(&mut t, "token").unwrap();
        assert_eq!((tok.perm, tok.uid, tok.gid), (0o444, 5000, 2000));
        let db = look(&mut t, "db").unwrap();
        assert_eq!((db.perm, db.uid), (0o555, 1000), "directories keep --uid");
    }

    #[test]
    fn reads_at_offsets() {
        let mut t = tree(vec![file(1, 1, "k", b"0123456789")]);
        let ino = look(&mut t, "k").unwrap().ino;
        assert_eq!(t.read(ino, 0, 4).unwrap().bytes(), b"0123");
        assert_eq!(t.read(ino, 8, 100).unwrap().bytes(), b"89");
        assert_eq!(t.read(ino, 10, 4).unwrap().bytes(), b"");
        assert_eq!(t.read(ino, u64::MAX, 4).unwrap().bytes(), b"");
        assert_eq!(t.read(ROOT_INO, 0, 1).err(), Some(FsError::IsDir));
        assert_eq!(t.read(999, 0, 1).err(), Some(FsError::Stale));
    }

    #[test]
    fn directory_listing_and_cookies() {
        let mut t = tree(vec![
            file(1, 1, "b", b""),
            file(2, 1, "a/x", b""),
            file(3, 1, "a/y", b""),
        ]);
        assert_eq!(list(&mut t, ROOT_INO), [".", "..", ".secretfs", "a", "b"]);
        let a = look(&mut t, "a").unwrap().ino;
        assert_eq!(list(&mut t, a), [".", "..", "x", "y"]);
        assert_eq!(list(&mut t, CONTROL_INO), [".", "..", "status"]);

        // Resume after the cookie of the third entry.
        let mut rest = Vec::new();
        t.readdir(ROOT_INO, 3, false, |e| {
            rest.push((e.offset, e.name.clone()));
            false
        })
        .unwrap();
        assert_eq!(rest, [(4, "a".to_owned()), (5, "b".to_owned())]);

        // A full buffer stops the listing; the refused entry is not counted.
        let mut n = 0;
        t.readdir(ROOT_INO, 0, true, |_| {
            n += 1;
            n > 4
        })
        .unwrap();
        let b_before = t.nodes[&t.children(ROOT_INO).unwrap()["b"]].nlookup;
        assert_eq!(b_before, 0, "entry that did not fit is not a lookup");
        assert_eq!(t.nodes[&a].nlookup, 2, "lookup + readdirplus");
        let b = look(&mut t, "b").unwrap().ino;
        assert_eq!(t.readdir(b, 0, false, |_| false), Err(FsError::NotDir));
    }

    #[test]
    fn dot_names_are_not_shown_and_control_dir_is_reserved() {
        let mut t = tree(vec![file(1, 1, ".secretfs", b"x"), file(2, 1, "ok", b"y")]);
        let status = look(&mut t, ".secretfs/status").unwrap();
        assert_eq!(status.ino, STATUS_INO);
        assert_eq!(list(&mut t, ROOT_INO), [".", "..", ".secretfs", "ok"]);
    }

    #[test]
    fn rotation_gives_a_new_inode_and_old_handles_keep_old_bytes() {
        let mut t = tree(vec![file(1, 1, "db/pw", b"old")]);
        let db = look(&mut t, "db").unwrap().ino;
        let old = look(&mut t, "db/pw").unwrap().ino; // kernel holds a ref (open file)

        let inval = t.apply(
            &Snapshot::build(vec![file(1, 2, "db/pw", b"new!")]),
            UNIX_EPOCH,
        );
        assert!(inval.contains(&Invalidation::Entry {
            parent: db,
            name: "pw".into()
        }));
        assert!(inval.contains(&Invalidation::Inode { ino: db }));

        let new = look(&mut t, "db/pw").unwrap();
        assert_ne!(new.ino, old);
        assert_eq!(new.size, 4);
        assert_eq!(read_all(&t, new.ino), b"new!");
        assert_eq!(read_all(&t, old), b"old", "open handle keeps its version");
        assert_eq!(
            look(&mut t, "db").unwrap().ino,
            db,
            "directory keeps its inode"
        );

        // Once the kernel forgets the old inode, it is gone (and wiped).
        let before = t.inode_count();
        t.forget(old, 1);
        assert_eq!(t.inode_count(), before - 1);
        assert_eq!(t.getattr(old), Err(FsError::Stale));
        // Forgetting a current inode keeps it.
        t.forget(new.ino, 1);
        assert_eq!(read_all(&t, new.ino), b"new!");
    }

    #[test]
    fn a_secret_leaving_the_view_cuts_its_open_handles() {
        // Review finding 3: the kernel kept serving a revoked secret's pages
        // to descriptors opened before.
        let mut t = tree(vec![file(1, 1, "db/pw", b"v1"), file(2, 1, "tok", b"t")]);
        let v1 = look(&mut t, "db/pw").unwrap().ino; // open, then rotated
        t.apply(
            &Snapshot::build(vec![file(1, 2, "db/pw", b"v2"), file(2, 1, "tok", b"t")]),
            UNIX_EPOCH,
        );
        let v2 = look(&mut t, "db/pw").unwrap().ino; // open too
        let tok = look(&mut t, "tok").unwrap().ino;
        assert_eq!(
            read_all(&t, v1),
            b"v1",
            "a rotation keeps the old handle's version"
        );

        // Secret 1 revoked: both of its inodes are cut, in the kernel too.
        let inval = t.apply(&Snapshot::build(vec![file(2, 1, "tok", b"t")]), UNIX_EPOCH);
        assert!(
            inval.contains(&Invalidation::Inode { ino: v1 }),
            "{inval:?}"
        );
        assert!(
            inval.contains(&Invalidation::Inode { ino: v2 }),
            "{inval:?}"
        );
        assert!(
            !inval.contains(&Invalidation::Inode { ino: tok }),
            "{inval:?}"
        );
        assert_eq!(t.read(v1, 0, 10).err(), Some(FsError::Revoked));
        assert_eq!(t.read(v2, 0, 10).err(), Some(FsError::Revoked));
        assert_eq!(t.getattr(v2).unwrap().nlink, 0);
        assert_eq!(read_all(&t, tok), b"t");
        // Nothing more to say on the next change; forgetting drops them.
        let again = t.apply(&Snapshot::build(vec![file(2, 1, "tok", b"t")]), UNIX_EPOCH);
        assert!(again.is_empty(), "{again:?}");
        let before = t.inode_count();
        t.forget(v1, 1);
        t.forget(v2, 1);
        assert_eq!(t.inode_count(), before - 2);

        // Granted again: a fresh inode with the bytes, never the cut one.
        t.apply(
            &Snapshot::build(vec![file(1, 2, "db/pw", b"v2"), file(2, 1, "tok", b"t")]),
            UNIX_EPOCH,
        );
        let back = look(&mut t, "db/pw").unwrap().ino;
        assert!(back != v1 && back != v2);
        assert_eq!(read_all(&t, back), b"v2");
    }

    #[test]
    fn unchanged_secrets_keep_inodes_and_send_nothing() {
        let mut t = tree(vec![file(1, 1, "a", b"1"), file(2, 1, "d/b", b"2")]);
        let a = look(&mut t, "a").unwrap().ino;
        let inval = t.apply(
            &Snapshot::build(vec![file(1, 1, "a", b"1"), file(2, 1, "d/b", b"2")]),
            UNIX_EPOCH,
        );
        assert!(inval.is_empty(), "{inval:?}");
        assert_eq!(look(&mut t, "a").unwrap().ino, a);
    }

    #[test]
    fn metadata_change_is_a_new_inode() {
        let mut t = tree(vec![file(1, 1, "a", b"1")]);
        let a = look(&mut t, "a").unwrap().ino;
        let mut f = file(1, 1, "a", b"1");
        f.mode = 0o444;
        let inval = t.apply(&Snapshot::build(vec![f]), UNIX_EPOCH);
        assert_eq!(inval.len(), 2);
        let now = look(&mut t, "a").unwrap();
        assert_ne!(now.ino, a);
        assert_eq!(now.perm, 0o444);
    }

    #[test]
    fn delete_removes_names_and_empty_directories() {
        let mut t = tree(vec![file(1, 1, "keep", b"k"), file(2, 1, "x/y/z", b"z")]);
        let x = look(&mut t, "x").unwrap().ino;
        let y = look(&mut t, "x/y").unwrap().ino;
        let z = look(&mut t, "x/y/z").unwrap().ino;
        let count = t.inode_count();

        let inval = t.apply(&Snapshot::build(vec![file(1, 1, "keep", b"k")]), UNIX_EPOCH);
        assert_eq!(
            inval,
            [
                Invalidation::Delete {
                    parent: y,
                    child: z,
                    name: "z".into()
                },
                Invalidation::Delete {
                    parent: x,
                    child: y,
                    name: "y".into()
                },
                Invalidation::Delete {
                    parent: ROOT_INO,
                    child: x,
                    name: "x".into()
                },
                Invalidation::Inode { ino: ROOT_INO },
                // z is open somewhere: its cached pages must go too.
                Invalidation::Inode { ino: z },
            ]
        );
        assert_eq!(look(&mut t, "x"), Err(FsError::NotFound));
        assert_eq!(list(&mut t, ROOT_INO), [".", "..", ".secretfs", "keep"]);
        // Still referenced by the kernel: kept until forgotten, but empty,
        // and the deleted secret's bytes are gone.
        assert_eq!(t.inode_count(), count);
        assert_eq!(t.lookup(x, OsStr::new("y")), Err(FsError::NotFound));
        assert_eq!(t.read(z, 0, 10).err(), Some(FsError::Revoked));
        // `look` walks the path, so x was looked up 3 times and y twice.
        t.forget(z, 1);
        t.forget(y, 2);
        t.forget(x, 2);
        assert_eq!(t.inode_count(), count - 2, "x still has one reference");
        t.forget(x, 1);
        assert_eq!(t.inode_count(), count - 3);

        // The path comes back: a fresh directory inode.
        t.apply(&Snapshot::build(vec![file(3, 1, "x/w", b"w")]), UNIX_EPOCH);
        assert_ne!(look(&mut t, "x").unwrap().ino, x);
    }

    #[test]
    fn unreferenced_old_versions_are_dropped_at_once() {
        let mut t = tree(vec![file(1, 1, "a", b"1")]);
        let count = t.inode_count();
        t.apply(&Snapshot::build(vec![file(1, 2, "a", b"2")]), UNIX_EPOCH);
        assert_eq!(
            t.inode_count(),
            count,
            "old version never looked up: dropped"
        );
    }

    #[test]
    fn added_names_clear_negative_dentries() {
        let mut t = tree(vec![]);
        let inval = t.apply(&Snapshot::build(vec![file(1, 1, "new", b"n")]), UNIX_EPOCH);
        assert_eq!(
            inval,
            [
                Invalidation::Entry {
                    parent: ROOT_INO,
                    name: "new".into()
                },
                Invalidation::Inode { ino: ROOT_INO },
            ]
        );
    }

    #[test]
    fn file_replaced_by_directory() {
        let mut t = tree(vec![file(1, 1, "a", b"1")]);
        let a = look(&mut t, "a").unwrap().ino;
        let inval = t.apply(&Snapshot::build(vec![file(2, 1, "a/b", b"2")]), UNIX_EPOCH);
        assert!(inval.contains(&Invalidation::Entry {
            parent: ROOT_INO,
            name: "a".into()
        }));
        assert_eq!(look(&mut t, "a/b").unwrap().size, 1);
        // Secret 1 left the view: its open handle reads nothing more.
        assert!(inval.contains(&Invalidation::Inode { ino: a }));
        assert_eq!(t.read(a, 0, 10).err(), Some(FsError::Revoked));
    }

    #[test]
    fn status_content_and_wipe() {
        let mut t = tree(vec![file(1, 1, "a", b"secret")]);
        let a = look(&mut t, "a").unwrap().ino;
        assert_eq!(
            t.set_status(b"{\"ok\":true}\n".to_vec(), UNIX_EPOCH),
            Invalidation::Inode { ino: STATUS_INO }
        );
        assert_eq!(t.getattr(STATUS_INO).unwrap().size, 12);
        assert_eq!(t.read(STATUS_INO, 1, 4).unwrap().bytes(), b"\"ok\"");

        let inval = t.wipe(UNIX_EPOCH);
        assert!(inval.contains(&Invalidation::Delete {
            parent: ROOT_INO,
            child: a,
            name: "a".into()
        }));
        assert!(inval.contains(&Invalidation::Inode { ino: a }));
        assert_eq!(
            t.read(a, 0, 10).err(),
            Some(FsError::Revoked),
            "wiped even while referenced"
        );
        assert_eq!(list(&mut t, ROOT_INO), [".", "..", ".secretfs"]);
        assert_eq!(look(&mut t, ".secretfs/status").unwrap().ino, STATUS_INO);
    }

    #[test]
    fn fail_closed_hides_every_secret_and_keeps_status() {
        let mut t = tree(vec![file(1, 1, "db/pw", b"old"), file(2, 1, "top", b"t")]);
        let db = look(&mut t, "db").unwrap().ino;
        let old = look(&mut t, "db/pw").unwrap().ino; // an open file
        t.apply(
            &Snapshot::build(vec![file(1, 2, "db/pw", b"new"), file(2, 1, "top", b"t")]),
            UNIX_EPOCH,
        );
        let top = look(&mut t, "top").unwrap().ino;

        let inval = t.set_fail_closed(true);
        for want in [
            Invalidation::Entry {
                parent: ROOT_INO,
                name: "db".into(),
            },
            Invalidation::Entry {
                parent: db,
                name: "pw".into(),
            },
            Invalidation::Inode { ino: old },
            Invalidation::Inode { ino: top },
            Invalidation::Inode { ino: ROOT_INO },
        ] {
            assert!(inval.contains(&want), "{want:?} missing from {inval:?}");
        }
        assert!(!inval.contains(&Invalidation::Entry {
            parent: ROOT_INO,
            name: CONTROL_DIR.into()
        }));
        assert!(
            t.set_fail_closed(true).is_empty(),
            "no change, nothing to send"
        );

        assert_eq!(look(&mut t, "top"), Err(FsError::Unavailable));
        assert_eq!(look(&mut t, "db/pw"), Err(FsError::Unavailable));
        assert_eq!(t.getattr(top), Err(FsError::Unavailable));
        assert_eq!(t.read(old, 0, 10).err(), Some(FsError::Unavailable));
        assert_eq!(list(&mut t, ROOT_INO), [".", "..", ".secretfs"]);
        assert_eq!(look(&mut t, ".secretfs/status").unwrap().ino, STATUS_INO);
        assert!(t.getattr(ROOT_INO).is_ok());

        assert!(!t.set_fail_closed(false).is_empty());
        assert_eq!(read_all(&t, old), b"old", "open handle keeps its version");
        let pw = look(&mut t, "db/pw").unwrap().ino;
        assert_eq!(read_all(&t, pw), b"new");
    }
}

/// Random sequences of snapshots (renames, rotations, deletions, files
/// turning into directories and back), with the kernel holding references
/// to some inodes across them.
#[cfg(test)]
mod properties {
    use std::collections::{BTreeSet, HashMap};

    use proptest::prelude::*;

    use super::*;
    use crate::snapshot::tests::file;
    use crate::snapshot::SecretFile;

    /// One secret as the server would send it: (id, version, mode, path).
    type Candidate = (u64, u64, u32, String);

    fn path() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..=3)
            .prop_map(|segs| segs.join("/"))
    }

    fn candidates() -> impl Strategy<Value = Vec<Candidate>> {
        prop::collection::vec(
            (
                0u64..6,
                1u64..4,
                prop::sample::select(vec![0u32, 0o440]),
                path(),
            ),
            0..7,
        )
    }

    /// A version's bytes never change: content follows from id and version.
    fn content(id: u64, version: u64) -> Vec<u8> {
        format!("secret-{id}-v{version}").into_bytes()
    }

    fn secret_files(cands: &[Candidate]) -> Vec<SecretFile> {
        // The server sends each secret once, under one name.
        let mut seen_ids = HashSet::new();
        let mut seen_names = HashSet::new();
        cands
            .iter()
            .filter(|(id, _, _, name)| seen_ids.insert(*id) && seen_names.insert(name.clone()))
            .map(|(id, version, mode, name)| {
                let mut f = file(*id, *version, name, &content(*id, *version));
                f.mode = *mode;
                f
            })
            .collect()
    }

    /// What a walk from the root finds.
    #[derive(Default)]
    struct Seen {
        /// File path -> (ino, parent ino).
        files: HashMap<String, (u64, u64)>,
        /// Directory path -> ino ("" is the root).
        dirs: HashMap<String, u64>,
    }

    /// Walks every listing, checking each entry against a lookup; the
    /// lookups count as kernel references, recorded in `held`.
    fn walk(t: &mut Tree, held: &mut HashMap<u64, u64>) -> Result<Seen, TestCaseError> {
        let mut seen = Seen::default();
        seen.dirs.insert(String::new(), ROOT_INO);
        let mut todo = vec![(String::new(), ROOT_INO)];
        let mut inos = HashSet::new();
        while let Some((path, dir)) = todo.pop() {
            let mut entries = Vec::new();
            t.readdir(dir, 0, false, |e| {
                entries.push(e.clone());
                false
            })
            .map_err(|e| TestCaseError::fail(format!("readdir {path:?}: {e}")))?;
            prop_assert_eq!(&entries[0].name, ".");
            prop_assert_eq!(&entries[1].name, "..");
            for e in &entries[2..] {
                if dir == ROOT_INO && e.name == CONTROL_DIR {
                    continue;
                }
                let attr = t
                    .lookup(dir, OsStr::new(&e.name))
                    .map_err(|err| TestCaseError::fail(format!("lookup {}: {err}", e.name)))?;
                *held.entry(attr.ino).or_default() += 1;
                prop_assert_eq!(attr, e.attr, "lookup and listing disagree on {}", &e.name);
                prop_assert!(inos.insert(attr.ino), "inode {} shown twice", attr.ino);
                let full = if path.is_empty() {
                    e.name.clone()
                } else {
                    format!("{path}/{}", e.name)
                };
                match attr.kind {
                    Kind::Dir => {
                        prop_assert_eq!(t.read(attr.ino, 0, 1).err(), Some(FsError::IsDir));
                        seen.dirs.insert(full.clone(), attr.ino);
                        todo.push((full, attr.ino));
                    }
                    Kind::File => {
                        let listed = t.readdir(attr.ino, 0, false, |_| false);
                        prop_assert_eq!(listed, Err(FsError::NotDir));
                        seen.files.insert(full, (attr.ino, dir));
                    }
                }
            }
        }
        Ok(seen)
    }

    fn check_step(
        t: &mut Tree,
        snap: &Snapshot,
        before: &Seen,
        before_snap: &Snapshot,
        inval: &[Invalidation],
        held: &mut HashMap<u64, u64>,
    ) -> Result<Seen, TestCaseError> {
        let old_held: Vec<u64> = held.keys().copied().collect();
        let seen = walk(t, held)?;

        // Exactly the snapshot's files, each with its own bytes and attributes.
        let shown: BTreeSet<&str> = seen.files.keys().map(String::as_str).collect();
        let want: BTreeSet<&str> = snap.files().iter().map(|f| f.name.as_str()).collect();
        prop_assert_eq!(shown, want);
        for f in snap.files() {
            let (ino, _) = seen.files[&f.name];
            let attr = t.getattr(ino).unwrap();
            prop_assert_eq!(attr.size, f.content.len() as u64);
            let mode = if f.mode == 0 { DEFAULTS_MODE } else { f.mode };
            prop_assert_eq!(u32::from(attr.perm), mode);
            let bytes = t.read(ino, 0, u32::MAX).unwrap().bytes().to_vec();
            prop_assert_eq!(bytes, content(f.id, f.version));
            // An unchanged secret keeps its inode (and the kernel its pages).
            if let Some(old) = before_snap.files().iter().find(|o| o.name == f.name) {
                if old.fingerprint() == f.fingerprint() {
                    prop_assert_eq!(Some(ino), before.files.get(&f.name).map(|x| x.0));
                }
            }
        }
        // A directory keeps its inode while its path exists.
        for (path, ino) in &seen.dirs {
            if let Some(old) = before.dirs.get(path) {
                prop_assert_eq!(old, ino, "directory {:?} changed inode", path);
            }
        }
        // Whatever name now points elsewhere, or nowhere, the kernel hears of.
        for (path, &(old_ino, parent)) in &before.files {
            if seen.files.get(path).map(|x| x.0) == Some(old_ino) {
                continue;
            }
            let name = path.rsplit('/').next().unwrap();
            let told = inval.iter().any(|i| match i {
                Invalidation::Entry { parent: p, name: n } => *p == parent && n == name,
                Invalidation::Delete {
                    parent: p,
                    child,
                    name: n,
                } => *p == parent && *child == old_ino && n == name,
                Invalidation::Inode { .. } => false,
            });
            prop_assert!(told, "{path} changed without an invalidation: {inval:?}");
        }
        // An inode the kernel still holds keeps its version after a
        // rotation, and loses its bytes once its secret leaves the view.
        let current: HashSet<u64> = seen
            .files
            .values()
            .map(|x| x.0)
            .chain(seen.dirs.values().copied())
            .collect();
        let ids: HashSet<u64> = snap.files().iter().map(|f| f.id).collect();
        for ino in old_held {
            if current.contains(&ino) {
                continue;
            }
            let Some(old) = before_snap
                .files()
                .iter()
                .find(|f| before.files.get(&f.name).map(|x| x.0) == Some(ino))
            else {
                continue; // a directory, or held from an earlier step
            };
            let read = t.read(ino, 0, u32::MAX).map(|r| r.bytes().to_vec());
            if ids.contains(&old.id) {
                prop_assert_eq!(read, Ok(content(old.id, old.version)));
            } else {
                prop_assert_eq!(read, Err(FsError::Revoked));
            }
        }
        Ok(seen)
    }

    const DEFAULTS_MODE: u32 = 0o400;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn apply_keeps_the_tree_consistent(
            steps in prop::collection::vec((candidates(), any::<bool>()), 1..8)
        ) {
            let defaults = Defaults { uid: 1000, gid: 2000, mode: DEFAULTS_MODE, force: Force::default() };
            let mut t = Tree::new(defaults, UNIX_EPOCH);
            let mut held: HashMap<u64, u64> = HashMap::new();
            let mut before = Seen::default();
            before.dirs.insert(String::new(), ROOT_INO);
            let mut before_snap = Snapshot::empty();
            for (cands, forget_first) in steps {
                if forget_first {
                    for (ino, n) in held.drain() {
                        t.forget(ino, n);
                    }
                }
                let shown: HashSet<String> =
                    before_snap.files().iter().map(|f| f.name.clone()).collect();
                let snap = Snapshot::build_over(secret_files(&cands), |n| shown.contains(n));
                let inval = t.apply(&snap, UNIX_EPOCH);
                let seen = check_step(&mut t, &snap, &before, &before_snap, &inval, &mut held)?;
                before = seen;
                before_snap = snap;
            }
            // Once the kernel forgets everything, only the current tree is
            // left: nothing leaks.
            for (ino, n) in held.drain() {
                t.forget(ino, n);
            }
            let files = before_snap.files().len();
            prop_assert_eq!(t.inode_count(), 2 + before.dirs.len() + files);
            // And wiping leaves nothing of any secret.
            t.wipe(UNIX_EPOCH);
            prop_assert_eq!(t.inode_count(), 3);
        }
    }
}

#[cfg(test)]
mod prop_tests;
