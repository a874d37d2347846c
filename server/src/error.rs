//! The server's error type, and its one conversion to a gRPC status.
//!
//! Every message says what went wrong and what to do. None carries secret
//! content: names, versions and sizes only.

use tonic::{Code, Status};

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid {kind} name \"{name}\": {why}")]
    InvalidName {
        kind: &'static str,
        name: String,
        why: String,
    },
    #[error("{0}")]
    InvalidArgument(String),
    /// A CSR this server will not sign; `why` alone goes to the audit log.
    #[error(
        "the CSR cannot be signed: {why}. Give a PEM 'CERTIFICATE REQUEST' for a key of one of these types: {}",
        crate::pki::ACCEPTED_KEYS
    )]
    BadCsr { why: String },
    #[error("secret content is {size} bytes, over the limit of {max} bytes; store a smaller value or start the server with a larger --max-secret-size")]
    TooLarge { size: usize, max: usize },
    #[error("{kind} \"{name}\" already exists{hint}")]
    AlreadyExists {
        kind: &'static str,
        name: String,
        hint: &'static str,
    },
    #[error("{kind} \"{name}\" not found{hint}")]
    NotFound {
        kind: &'static str,
        name: String,
        hint: &'static str,
    },
    #[error("secret \"{name}\" cannot be added: secret \"{existing}\" exists, and a name cannot be both a file and a directory in the mount (\"db\" beside \"db/password\"); choose another name or delete \"{existing}\" first")]
    NameConflict { name: String, existing: String },
    #[error(
        "secret \"{name}\" has no version {version}; `secretfs secret versions {name}` lists them"
    )]
    NoSuchVersion { name: String, version: u64 },
    #[error("secret \"{name}\" version {version} failed its integrity check: the stored data was altered, moved between rows, or sealed with another master key; restore the database or the right master key from backup")]
    Integrity { name: String, version: u64 },
    #[error("cryptography failed: {0}")]
    Crypto(&'static str),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    /// The call is not possible in the target's present state (e.g.
    /// renewing a client whose certificates come from another CA).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The store failed (not a missing or duplicate name: those become
    /// `NotFound` and `AlreadyExists`).
    #[error(transparent)]
    Store(StoreError),
    /// Over a budget the server keeps (e.g. refusal reports).
    #[error("{0}")]
    OverBudget(String),
    /// The server could not run the call (shutting down, a task failed).
    #[error("{0}")]
    Stopped(&'static str),
    /// Making or signing a certificate failed.
    #[error("{what}: {source}")]
    Pki {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0}")]
    Config(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn not_found(kind: &'static str, name: &str) -> Self {
        let hint = match kind {
            "secret" => "; `secretfs secret list` shows the secrets",
            "client" => "; `secretfs client list` shows the clients",
            "group" => "; `secretfs group list` shows the groups",
            _ => "",
        };
        Error::NotFound {
            kind,
            name: name.to_owned(),
            hint,
        }
    }

    pub fn exists(kind: &'static str, name: &str) -> Self {
        let hint = match kind {
            "secret" => "; use `secretfs secret rotate` to add a new version",
            _ => "",
        };
        Error::AlreadyExists {
            kind,
            name: name.to_owned(),
            hint,
        }
    }

    fn code(&self) -> Code {
        match self {
            Error::InvalidName { .. }
            | Error::InvalidArgument(_)
            | Error::BadCsr { .. }
            | Error::TooLarge { .. } => Code::InvalidArgument,
            Error::AlreadyExists { .. } | Error::NameConflict { .. } => Code::AlreadyExists,
            Error::NotFound { .. } | Error::NoSuchVersion { .. } => Code::NotFound,
            Error::Integrity { .. } => Code::DataLoss,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Store(
                StoreError::Unwritable(_)
                | StoreError::Unavailable(_)
                | StoreError::OutcomeUnknown(_),
            ) => Code::Unavailable,
            Error::OverBudget(_) => Code::ResourceExhausted,
            Error::Crypto(_)
            | Error::Store(_)
            | Error::Stopped(_)
            | Error::Pki { .. }
            | Error::Config(_)
            | Error::Io { .. } => Code::Internal,
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        Status::new(err.code(), err.to_string())
    }
}

impl From<StoreError> for Error {
    fn from(err: StoreError) -> Error {
        match err {
            StoreError::NotFound { kind, name } => Error::not_found(kind.as_str(), &name),
            StoreError::AlreadyExists { kind, name } => Error::exists(kind.as_str(), &name),
            StoreError::NoSuchVersion { name, version } => Error::NoSuchVersion { name, version },
            e @ StoreError::External { .. } => Error::FailedPrecondition(e.to_string()),
            StoreError::NameConflict { name, existing } => Error::NameConflict { name, existing },
            StoreError::Check(source) => handed_back(source, StoreError::Check),
            StoreError::Seal(source) => handed_back(source, StoreError::Seal),
            other => Error::Store(other),
        }
    }
}

/// The check and seal functions the store calls are ours: their error is
/// handed back as it was; anything else stays a store error (`rewrap`).
fn handed_back(
    source: Box<dyn std::error::Error + Send + Sync>,
    rewrap: fn(Box<dyn std::error::Error + Send + Sync>) -> StoreError,
) -> Error {
    match source.downcast::<Error>() {
        Ok(ours) => *ours,
        Err(other) => Error::Store(rewrap(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn our_errors_come_back_from_the_store_as_they_were() {
        let ours = || Box::new(Error::InvalidArgument("too many labels".into()));
        for store in [StoreError::Check(ours()), StoreError::Seal(ours())] {
            assert!(
                matches!(Error::from(store), Error::InvalidArgument(m) if m == "too many labels")
            );
        }
        let theirs = Error::from(StoreError::Seal("boom".into()));
        assert!(
            matches!(theirs, Error::Store(StoreError::Seal(_))),
            "{theirs}"
        );
        let theirs = Error::from(StoreError::Check("boom".into()));
        assert!(
            matches!(theirs, Error::Store(StoreError::Check(_))),
            "{theirs}"
        );
    }
}
