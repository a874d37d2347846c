//! A mount of a fixed set of secrets, without a server: the same tree, FUSE
//! adapter and unmount path as [`run`](crate::run), for end-to-end tests,
//! benchmarks and demos. Blocking; needs no async runtime.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use zeroize::Zeroize;

use crate::error::MountError;
use crate::fuse::SecretFs;
use crate::mount::{self, Mounted};
use crate::secret_bytes::SecretBytes;
use crate::snapshot::{SecretFile, Snapshot};
use crate::status::SyncState;
use crate::tree::{Defaults, Force, Tree};
use crate::updater::Updater;

/// One secret to show. `content` is wiped once copied into locked memory.
pub struct StaticSecret {
    pub id: u64,
    pub version: u64,
    pub name: String,
    /// 0 = the mount's default mode.
    pub mode: u32,
    pub owner: Option<u32>,
    pub group: Option<u32>,
    /// Unix seconds; the file's mtime.
    pub created_at: i64,
    pub content: Vec<u8>,
}

impl StaticSecret {
    pub fn new(id: u64, version: u64, name: &str, content: &[u8]) -> StaticSecret {
        StaticSecret {
            id,
            version,
            name: name.to_owned(),
            mode: 0,
            owner: None,
            group: None,
            created_at: 0,
            content: content.to_vec(),
        }
    }
}

/// A secret handed over but never shown (an error on the way) is wiped too.
impl Drop for StaticSecret {
    fn drop(&mut self) {
        self.content.zeroize();
    }
}

fn snapshot(secrets: Vec<StaticSecret>) -> Snapshot {
    let files = secrets
        .into_iter()
        .map(|mut s| {
            // `s` is dropped at the end of this closure, which wipes its copy.
            let content = Arc::new(SecretBytes::copy_from(&s.content));
            SecretFile {
                id: s.id,
                version: s.version,
                name: std::mem::take(&mut s.name),
                mode: s.mode,
                owner: s.owner,
                group: s.group,
                mtime: s.created_at,
                meta_digest: 0,
                content,
            }
        })
        .collect();
    Snapshot::build(files)
}

pub struct StaticMount {
    updater: Updater,
    mounted: Mounted,
    path: PathBuf,
}

impl StaticMount {
    /// Mounts `secrets` at `path` (an empty directory) with default owner
    /// `uid`/`gid` and file mode `mode`.
    pub fn mount(
        path: &Path,
        uid: u32,
        gid: u32,
        mode: u32,
        secrets: Vec<StaticSecret>,
    ) -> Result<StaticMount, MountError> {
        mount::check_fuse()?;
        let path = mount::prepare_mountpoint(path)?;
        let defaults = Defaults {
            uid,
            gid,
            mode,
            force: Force::default(),
        };
        let tree = Arc::new(Mutex::new(Tree::new(defaults, SystemTime::now())));
        let mut updater = Updater::new(
            tree.clone(),
            SyncState {
                server: "static".into(),
                ..SyncState::default()
            },
        );
        updater.synced(snapshot(secrets));
        let mounted = mount::mount(SecretFs::new(tree), &path)?;
        updater.set_notifier(mounted.notifier());
        Ok(StaticMount {
            updater,
            mounted,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Replaces the whole set, as a sync would (invalidations included).
    pub fn update(&mut self, secrets: Vec<StaticSecret>) {
        self.updater.synced(snapshot(secrets));
    }

    /// Rewrites `.secretfs/status` (the live mount does this every second).
    pub fn publish_status(&mut self) {
        self.updater.publish_status();
    }

    /// Unmounts (lazy detach, then waits up to `grace` for open files) and
    /// wipes every secret.
    pub fn unmount(self, grace: Duration) {
        let StaticMount {
            mut updater,
            mounted,
            ..
        } = self;
        mounted.unmount(grace);
        updater.wipe();
    }
}
