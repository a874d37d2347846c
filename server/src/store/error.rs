//! The store's own error: what any backend can report, in terms of the
//! data model rather than of SQLite or PostgreSQL.

use std::path::PathBuf;

/// What a name refers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entity {
    Secret,
    Client,
    Group,
}

impl Entity {
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Secret => "secret",
            Entity::Client => "client",
            Entity::Group => "group",
        }
    }
}

impl std::fmt::Display for Entity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("{kind} \"{name}\" not found")]
    NotFound { kind: Entity, name: String },
    #[error("{kind} \"{name}\" already exists")]
    AlreadyExists { kind: Entity, name: String },
    /// A certificate was to be pinned to a client registered as external
    /// (its certificates come from the operator's own CA).
    #[error("client \"{name}\" is registered as external: its certificates come from your own CA (`server run --client-ca`), which this server cannot sign for")]
    External { name: String },
    #[error("secret \"{name}\" has no version {version}")]
    NoSuchVersion { name: String, version: u64 },
    /// A secret name would be both a file and a directory in a mount
    /// (`db` beside `db/password`).
    #[error("secret \"{name}\" conflicts with secret \"{existing}\": a name cannot be both a file and a directory in the mount")]
    NameConflict { name: String, existing: String },
    /// The caller's check of a change's result refused it; nothing was
    /// written.
    #[error("{0}")]
    Check(#[source] Source),
    /// The caller's seal function failed; nothing was written.
    #[error("{0}")]
    Seal(#[source] Source),
    #[error("the database is not writable ({0}); check the state directory's permissions and free space")]
    Unwritable(#[source] Source),
    /// The database cannot be reached right now (PostgreSQL down, the
    /// network, a failover): worth retrying, nothing was written.
    #[error("the database is unavailable ({0}); requests are refused until it is back")]
    Unavailable(String),
    /// The connection to the database was lost while the commit was on
    /// its way: the change may or may not have been made (unlike
    /// `Unavailable`, which means nothing was written).
    #[error("the database connection was lost while committing: the change may or may not have been made; check (e.g. `secretfs secret versions NAME`) before repeating it ({0})")]
    OutcomeUnknown(String),
    #[error("database {} does not exist; is this a state directory made by `secretfs server init`?", .path.display())]
    Missing { path: PathBuf },
    #[error("the database schema is version {found}, newer than this secretfs understands ({known}); run a newer secretfs")]
    NewerSchema { found: u64, known: u64 },
    /// The master key does not open the database's key check (found where
    /// the store itself must know, e.g. before it signs an upgraded
    /// database's rows).
    #[error("the master key does not match this database (it was made with another key); nothing was changed")]
    KeyMismatch,
    /// A grouped commit this write was part of failed (the cause is shared
    /// by every write in the group, so it is kept as text).
    #[error("storage error: the commit failed: {0}")]
    CommitFailed(String),
    #[error("storage error: {0}")]
    Backend(#[source] Source),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    pub fn not_found(kind: Entity, name: &str) -> Self {
        StoreError::NotFound {
            kind,
            name: name.to_owned(),
        }
    }

    pub fn exists(kind: Entity, name: &str) -> Self {
        StoreError::AlreadyExists {
            kind,
            name: name.to_owned(),
        }
    }

    pub fn backend(err: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(Box::new(err))
    }
}
